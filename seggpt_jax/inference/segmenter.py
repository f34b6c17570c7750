"""In-context segmentation in three lines: :class:`Segmenter` owns the model, its processor and its
compiled programs.

    from seggpt_jax import Segmenter
    segmenter = Segmenter.from_pretrained("BAAI/seggpt-vit-large")
    result = segmenter.segment("street.jpg", prompts=("street_1.jpg", "street_1_cars.png"))

``result.mask`` is the query's mask at its original size: a boolean foreground (binary mode, the
default) or class ids ``0..num_labels`` (``num_labels=N``, semantic mode). Several prompts for one query
are feature-ensembled; a list of queries may share prompts or bring their own. Batches are padded to
at most two sizes per prompt count, so a folder of any length and any image sizes compiles at most
twice.
"""

from __future__ import annotations

import dataclasses
import os
import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from ..nn.inputs import EMBEDDING_TYPES, ENSEMBLE_MODES
from ..imaging.processor import (SegGptImageProcessor, build_palette, mask_to_rgb, nearest_palette, open_image,
                         painted_query, to_label_map, to_rgb_uint8, torch_nearest_index)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One in-context example: an image and its mask (paths, PIL images or arrays)."""

    image: Any
    mask: Any


@dataclasses.dataclass
class SegmentationResult:
    """The answer for one query, at the query's original size ``(height, width)``.

    Attributes:
        mask: ``[H, W]`` bool foreground (binary mode) or int64 class ids (semantic mode).
        painted: ``[H, W, 3]`` uint8: the colours the model painted (the raw answer).
        scores: ``[num_labels + 1, H, W]`` float32 ``-squared distance`` of each pixel's colour to
            each class colour (higher is closer), when requested.
        source: the query's path, when it was given as one.
    """

    mask: np.ndarray
    painted: np.ndarray
    scores: np.ndarray | None = None
    source: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.mask.shape)


def _is_image_like(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike, Image.Image, np.ndarray)) or hasattr(value, "__array__")


def _as_prompt(value: Any) -> Prompt | None:
    if isinstance(value, Prompt):
        return value
    if hasattr(value, "prompt_pixel_values") and hasattr(value, "prompt_masks"):  # a learned prompt
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_image_like(v) for v in value):
        return Prompt(*value)
    return None


def normalise_prompts(prompts: Any, num_queries: int) -> list[list[Any]]:
    """Per-query prompt lists from: one pair, a list of pairs (shared), one list of pairs per query, or a
    learned prompt (all of its prompts, shared)."""
    if callable(getattr(prompts, "prompts", None)):  # a LearnedPrompt
        prompts = prompts.prompts()
    single = _as_prompt(prompts)
    if single is not None:
        return [[single]] * num_queries
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be an (image, mask) pair, a list of pairs, or one list of pairs per query")
    shared = [_as_prompt(p) for p in prompts]
    if all(p is not None for p in shared):
        return [shared] * num_queries
    if len(prompts) == num_queries and all(isinstance(p, (list, tuple)) for p in prompts):
        per_query = [normalise_prompts(p, 1)[0] for p in prompts]
        return per_query
    raise ValueError(f"cannot read prompts: expected an (image, mask) pair, a list of pairs, or {num_queries} lists "
                     f"of pairs (one per query); got {type(prompts).__name__} of length {len(prompts)}")


class Segmenter:
    """A SegGPT model with its processor and compiled forward, ready for images, folders and videos.

    Args:
        model: a :class:`~seggpt_jax.SegGptForImageSegmentation`.
        batch_size: rows per forward (query x prompt pairs); default 32 on accelerators, 4 on CPU.
        ensemble_mode: how several prompts are combined (see the model's ``ensemble_mode``).
        compilation_cache: ``True`` or a folder: keep compiled programs across processes.
    """

    def __init__(self, model, *, batch_size: int | None = None, ensemble_mode: str = "transformers",
                 compilation_cache: bool | str | os.PathLike | None = None):
        if ensemble_mode not in ENSEMBLE_MODES:
            raise ValueError(f"ensemble_mode must be one of {ENSEMBLE_MODES}, got {ensemble_mode!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if compilation_cache:
            from ..runtime import enable_compilation_cache

            enable_compilation_cache(None if compilation_cache is True else compilation_cache)
        self.model = model
        self.processor = SegGptImageProcessor(size=model.config.query_size)
        self.batch_size = batch_size or (4 if jax.default_backend() == "cpu" else 32)
        self.ensemble_mode = ensemble_mode
        self.shapes_run: set[tuple[int, int]] = set()  # (rows, prompts per query) of every forward so far
        self._prompt_cache: dict[Any, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "BAAI/seggpt-vit-large", *,
                        batch_size: int | None = None, ensemble_mode: str = "transformers",
                        compilation_cache: bool | str | None = None, **load_kwargs: Any) -> "Segmenter":
        """Load the model (any source :meth:`SegGptForImageSegmentation.from_pretrained` accepts)."""
        from ..nn.models import SegGptForImageSegmentation

        model = SegGptForImageSegmentation.from_pretrained(name_or_path, **load_kwargs)
        return cls(model, batch_size=batch_size, ensemble_mode=ensemble_mode, compilation_cache=compilation_cache)

    # ------------------------------------------------------------------------------ preparation
    def prepare_query(self, image: Any) -> tuple[np.ndarray, tuple[int, int], str | None]:
        """``([3, h, w] float32, original (H, W), path or None)``."""
        source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
        rgb = to_rgb_uint8(image, what=f"query {source or ''}".strip())
        pixels = self.processor(images=rgb, return_tensors="np")["pixel_values"][0]
        return pixels, rgb.shape[:2], source

    def prepare_prompt(self, prompt: Any, num_labels: int | None) -> tuple[np.ndarray, np.ndarray]:
        """``([3, h, w] image, [3, h, w] mask)`` float32, cached per prompt object and mode within a call."""
        if hasattr(prompt, "prompt_pixel_values"):  # already model inputs (a learned prompt)
            return np.asarray(prompt.prompt_pixel_values), np.asarray(prompt.prompt_masks)
        key = (id(prompt.image), id(prompt.mask), num_labels)
        cached = self._prompt_cache.get(key)
        if cached is not None and cached[0] is prompt:
            return cached[1]
        image_rgb = to_rgb_uint8(prompt.image, what=f"prompt image {_name(prompt.image)}")
        mask_rgb = prompt_mask_rgb(prompt.mask, num_labels, what=f"prompt mask {_name(prompt.mask)}")
        if mask_rgb.shape[:2] != image_rgb.shape[:2]:
            import warnings

            warnings.warn(f"prompt mask {_name(prompt.mask)} is {mask_rgb.shape[1]}x{mask_rgb.shape[0]} but its image "
                          f"is {image_rgb.shape[1]}x{image_rgb.shape[0]}; both are resized to the model's input size "
                          f"independently", stacklevel=3)
        out = self.processor(prompt_images=image_rgb, prompt_masks=mask_rgb, do_convert_rgb=False,
                             return_tensors="np")
        arrays = (out["prompt_pixel_values"][0], out["prompt_masks"][0])
        self._prompt_cache[key] = (prompt, arrays)
        return arrays

    # ------------------------------------------------------------------------------ segmentation
    def segment(self, images: Any, prompts: Any, *, num_labels: int | None = None, binary: bool | None = None,
                embedding_type: str | Sequence[str] | None = None, return_scores: bool = False,
                progress: Callable[[int, int], None] | None = None) -> SegmentationResult | list[SegmentationResult]:
        """Segment one query (returns one result) or a list of queries (returns a list).

        Args:
            images: a path, PIL image or array, or a list of them.
            prompts: an ``(image, mask)`` pair or :class:`Prompt`; a list of them (each query gets all,
                feature-ensembled); or one list per query.
            num_labels: semantic mode: masks are class-id maps with ids ``0..num_labels`` and the
                result holds class ids. Without it (or with ``binary=True``) masks are foregrounds
                (any non-zero pixel) and the result is boolean.
            embedding_type: ``"semantic"``/``"instance"`` or one per query; default semantic with
                ``num_labels``, instance in binary mode.
            return_scores: also return per-class scores (``-squared colour distance``).
            progress: called as ``progress(done, total)`` after each batch.
        """
        single = not isinstance(images, (list, tuple))
        results = list(self.segment_iter([images] if single else list(images), prompts, num_labels=num_labels,
                                         binary=binary, embedding_type=embedding_type, return_scores=return_scores,
                                         progress=progress))
        return results[0] if single else results

    def segment_iter(self, images: Sequence[Any], prompts: Any, *, num_labels: int | None = None,
                     binary: bool | None = None, embedding_type: Any = None, return_scores: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> Iterator[SegmentationResult]:
        """Like :meth:`segment` for a list, yielding results in order as batches finish."""
        binary = num_labels is None if binary is None else bool(binary)
        labels = 1 if binary else num_labels
        if callable(getattr(prompts, "check_model", None)):  # a LearnedPrompt must fit this model
            prompts.check_model(self.model.config)
        if not binary and (num_labels is None or isinstance(num_labels, bool) or not isinstance(num_labels, int)
                           or num_labels < 1):
            raise ValueError(f"semantic mode needs num_labels >= 1, got {num_labels!r}")
        per_query = normalise_prompts(prompts, len(images))
        self._prompt_cache = {}  # processed prompts, shared by the queries of this call only
        types = _embedding_types(embedding_type, len(images), "instance" if binary else "semantic")
        groups: dict[int, list[int]] = {}
        for index, query_prompts in enumerate(per_query):
            groups.setdefault(len(query_prompts), []).append(index)
        palette = np.asarray(build_palette(labels), dtype=np.float32)
        done, pending = 0, {}
        next_index = 0
        for count, indices in sorted(groups.items()):
            per_batch = max(1, self.batch_size // count)
            for start in range(0, len(indices), per_batch):
                chunk = indices[start:start + per_batch]
                painted = self._paint([images[i] for i in chunk], [per_query[i] for i in chunk],
                                      [types[i] for i in chunk], labels, count, per_batch)
                for i, (pixels, size, source) in zip(chunk, painted):
                    pending[i] = _finish(pixels, size, source, palette, binary, return_scores)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(images))
                while next_index in pending:
                    yield pending.pop(next_index)
                    next_index += 1

    def _paint(self, queries: list, prompt_lists: list[list], types: list[str], labels: int, count: int,
               per_batch: int) -> list[tuple[np.ndarray, tuple[int, int], str | None]]:
        """One forward for up to ``per_batch`` queries with ``count`` prompts each -> painted 448 images."""
        prepared = [self.prepare_query(q) for q in queries]
        rows_q, rows_pi, rows_pm, rows_type = [], [], [], []
        for (pixels, _, _), prompt_list, kind in zip(prepared, prompt_lists, types):
            for prompt in prompt_list:
                image, mask = self.prepare_prompt(prompt, labels)
                rows_q.append(pixels)
                rows_pi.append(image)
                rows_pm.append(mask)
                rows_type.append(kind == "instance")
        real = len(rows_q)
        target = real if len(queries) == 1 else per_batch * count  # pad to one of two sizes
        for name_rows in (rows_q, rows_pi, rows_pm, rows_type):
            name_rows.extend(name_rows[real - count:real] * ((target - real) // count))
        self.shapes_run.add((target, count))
        out = self.model(np.stack(rows_q), np.stack(rows_pi), np.stack(rows_pm), feature_ensemble=count > 1,
                         embedding_type=np.asarray(rows_type), ensemble_mode=self.ensemble_mode,
                         prompts_per_query=count)
        painted = painted_query(out, self.processor.image_mean, self.processor.image_std)  # [rows, 3, h, w]
        return [(painted[i * count], size, source) for i, (_, size, source) in enumerate(prepared)]


    # ------------------------------------------------------------------------------ video
    def segment_video(self, frames: Iterable[Any], prompt: Any, *, context_frames: int = 0,
                      ensemble_mode: str = "original", embedding_type: str = "instance",
                      progress: Callable[[int], None] | None = None) -> Iterator[SegmentationResult]:
        """The SegGPT video procedure (``seggpt_engine.inference_video``), one binary result per frame.

        Each frame is segmented with the first prompt plus the last ``context_frames`` frames and their
        binarised predictions (painted mean > 128) as extra prompts, feature-ensembled (the BAAI
        ensemble by default, as its code does). The first ``context_frames`` frames have fewer prompts,
        so ``context_frames + 1`` programs are compiled.
        """
        if isinstance(context_frames, bool) or not isinstance(context_frames, int) or context_frames < 0:
            raise ValueError(f"context_frames must be a non-negative integer, got {context_frames!r}")
        if ensemble_mode not in ENSEMBLE_MODES or embedding_type not in EMBEDDING_TYPES:
            raise ValueError(f"ensemble_mode must be one of {ENSEMBLE_MODES} and embedding_type one of "
                             f"{EMBEDDING_TYPES}")
        first = _as_prompt(prompt)
        if first is None:
            raise ValueError("prompt must be an (image, mask) pair or a Prompt")
        first_image, first_mask = self.prepare_prompt(first, 1)
        context: collections.deque = collections.deque(maxlen=context_frames or None)
        palette = np.asarray(build_palette(1), dtype=np.float32)
        for index, frame in enumerate(frames):
            pixels, size, source = self.prepare_query(frame)
            images = [first_image] + [c[0] for c in context]
            masks = [first_mask] + [c[1] for c in context]
            count = len(images)
            self.shapes_run.add((count, count))
            out = self.model(np.stack([pixels] * count), np.stack(images), np.stack(masks),
                             feature_ensemble=count > 1, ensemble_mode=ensemble_mode, embedding_type=embedding_type)
            painted = painted_query(out, self.processor.image_mean, self.processor.image_std)[0]
            if context_frames:
                foreground = painted.mean(axis=0) > 128
                mask_rgb = np.repeat((foreground.astype(np.uint8) * 255)[..., None], 3, axis=-1)
                mask = self.processor(prompt_masks=mask_rgb, do_convert_rgb=False, return_tensors="np")["prompt_masks"]
                context.append((pixels, mask[0]))
            yield _finish(painted, size, source, palette, True, False)
            if progress is not None:
                progress(index + 1)


def _name(value: Any) -> str:
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else f"({type(value).__name__})"


def prompt_mask_rgb(mask: Any, num_labels: int, *, what: str) -> np.ndarray:
    """A prompt mask as the RGB picture the model sees: palette colours of its class ids.

    ``num_labels=1`` (binary mode) reads any non-zero pixel (in any channel) as foreground."""
    if num_labels == 1:
        if isinstance(mask, (str, os.PathLike)):
            mask = open_image(mask)
        if isinstance(mask, Image.Image):
            array = np.asarray(mask.convert("L") if mask.mode in ("LA", "PA") else mask)  # P: palette indices
        else:
            array = np.asarray(mask)
        if array.ndim == 3:
            colour = array[..., :3] if array.shape[-1] in (3, 4) else array[:3].transpose(1, 2, 0)
            foreground = np.any(colour != 0, axis=-1)
        elif array.ndim == 2:
            foreground = array != 0
        else:
            raise ValueError(f"{what} must be a 2-D mask or an RGB image, got shape {array.shape}")
        return mask_to_rgb(foreground.astype(np.int64), 1, what=what)
    labels = to_label_map(mask, what=what)
    if labels is None:  # an RGB colour mask: already in palette colours
        return to_rgb_uint8(mask, what=what)
    return mask_to_rgb(labels, num_labels, what=what)


def _embedding_types(embedding_type: Any, count: int, default: str) -> list[str]:
    if embedding_type is None:
        return [default] * count
    if isinstance(embedding_type, str):
        embedding_type = [embedding_type] * count
    types = list(embedding_type)
    if len(types) != count or any(t not in EMBEDDING_TYPES for t in types):
        raise ValueError(f"embedding_type must be 'instance', 'semantic', or one of them per query ({count}); "
                         f"got {embedding_type!r}")
    return types


def _finish(painted: np.ndarray, size: tuple[int, int], source: str | None, palette: np.ndarray, binary: bool,
            return_scores: bool) -> SegmentationResult:
    """Class ids at the model's resolution, then torch-``nearest`` to the query's size (the same as
    transformers' post-processing, which resizes first: nearest selection commutes with the argmin)."""
    classes, scores = nearest_palette(painted, palette)
    rows = torch_nearest_index(painted.shape[1], size[0])
    cols = torch_nearest_index(painted.shape[2], size[1])
    classes = classes[rows][:, cols]
    picture = np.clip(painted, 0, 255).astype(np.uint8).transpose(1, 2, 0)[rows][:, cols]
    return SegmentationResult(
        mask=classes == 1 if binary else classes,
        painted=picture,
        scores=scores[:, rows][:, :, cols].astype(np.float32) if return_scores else None,
        source=source,
    )


