"""Prompts: in-context examples, the forms a caller may give them in, and their model inputs."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from ..imaging.decode import describe, to_rgb_uint8
from ..imaging.masks import ColourMap, prompt_picture
from ..imaging.processor import SegGptImageProcessor


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One in-context example: an image and its mask (paths, PIL images or arrays)."""

    image: Any
    mask: Any


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedPrompt:
    """One prompt already preprocessed (:meth:`Segmenter.prepare_prompts`): ``[3, h, w]`` float32 model
    inputs, for binary mode (``num_labels=None``) or semantic mode with ``num_labels`` classes."""

    prompt_pixel_values: np.ndarray
    prompt_masks: np.ndarray
    num_labels: int | None = None


def _is_image_like(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike, Image.Image, np.ndarray)) or hasattr(value, "__array__")


def _is_prepared(value: Any) -> bool:
    """Already model inputs (one prompt of a learned prompt)."""
    return hasattr(value, "prompt_pixel_values") and hasattr(value, "prompt_masks")


def as_prompt(value: Any) -> Any | None:
    """A :class:`Prompt` (or prepared prompt) for one example, or ``None`` if ``value`` is not one."""
    if isinstance(value, Prompt) or _is_prepared(value):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_image_like(v) for v in value):
        return Prompt(*value)
    return None


def normalise_prompts(prompts: Any, num_queries: int | None) -> list[list[Any]] | list[Any]:
    """Per-query prompt lists from the accepted forms.

    Accepted: one pair (shared), a list of pairs (shared, ensembled), a learned prompt (all of its
    prompts, shared), or one list of pairs per query. Returns one list per query; when the prompts are
    shared and ``num_queries`` is ``None`` (a stream of queries), the shared list itself.
    """
    if callable(getattr(prompts, "prompts", None)):  # a LearnedPrompt
        prompts = prompts.prompts()
    single = as_prompt(prompts)
    if single is not None:
        return [single] if num_queries is None else [[single]] * num_queries
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be an (image, mask) pair, a list of pairs, or one list of pairs per query")
    shared = [as_prompt(p) for p in prompts]
    if all(p is not None for p in shared):
        return shared if num_queries is None else [shared] * num_queries
    if num_queries is not None and len(prompts) == num_queries and all(isinstance(p, (list, tuple)) for p in prompts):
        return [normalise_prompts(p, 1)[0] for p in prompts]
    expected = f"{num_queries} lists of pairs (one per query)" if num_queries is not None else \
        "one list of pairs per query (with a list of queries)"
    raise ValueError(f"cannot read prompts: expected an (image, mask) pair, a list of pairs, or {expected}; got "
                     f"{type(prompts).__name__} of length {len(prompts)}")


def is_per_query(prompts: Any) -> bool:
    """Whether ``prompts`` is one list of prompts per query (rather than prompts shared by all)."""
    if callable(getattr(prompts, "prompts", None)) or as_prompt(prompts) is not None:
        return False
    return isinstance(prompts, (list, tuple)) and bool(prompts) and any(as_prompt(p) is None for p in prompts)


def _name(value: Any) -> str:
    """A path as it is; anything else is named by the mask rule (its kind and shape)."""
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else ""


def _mode(num_labels: int | None) -> str:
    return "binary mode" if num_labels is None else f"semantic mode with {num_labels} labels"


class PromptPreparer:
    """Prompt -> ``([3, h, w] image, [3, h, w] mask)`` float32 model inputs, computed once per prompt
    object and mode."""

    def __init__(self, processor: SegGptImageProcessor, num_labels: int | None,
                 colour_map: ColourMap | Mapping | str | None = None):
        self.processor, self.num_labels = processor, num_labels
        self.colour_map = ColourMap.parse(colour_map) if colour_map is not None else None
        self._cache: dict[int, tuple[Any, tuple[np.ndarray, np.ndarray]]] = {}

    def __call__(self, prompt: Any) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompt, PreparedPrompt) and prompt.num_labels != self.num_labels:
            raise ValueError(f"a prompt prepared for {_mode(prompt.num_labels)} cannot be used in "
                             f"{_mode(self.num_labels)}; prepare it again for this mode")
        if _is_prepared(prompt):
            return np.asarray(prompt.prompt_pixel_values), np.asarray(prompt.prompt_masks)
        cached = self._cache.get(id(prompt))
        if cached is not None and cached[0] is prompt:
            return cached[1]
        image = to_rgb_uint8(prompt.image, what=f"prompt image {_name(prompt.image)}".strip())
        mask = prompt_picture(prompt.mask, self.num_labels, colour_map=self.colour_map,
                              what=f"prompt mask {_name(prompt.mask)}".strip())
        if mask.shape[:2] != image.shape[:2]:
            warnings.warn(f"prompt mask {describe(prompt.mask)} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                          f"{image.shape[1]}x{image.shape[0]}; both are resized to the model's input size "
                          f"independently", stacklevel=4)
        out = self.processor(prompt_images=image, prompt_masks=mask, do_convert_rgb=False, return_tensors="np")
        arrays = (out["prompt_pixel_values"][0], out["prompt_masks"][0])
        self._cache[id(prompt)] = (prompt, arrays)
        return arrays
