"""The SegGPT video procedure (``seggpt_engine.inference_video`` in the BAAI code), streamed.

Each frame is segmented with the first frame's prompt plus the last ``context_frames`` frames and
their binarised predictions (painted mean > 128) as extra prompts, feature-ensembled (the BAAI
ensemble by default, as its code does). Frames are read, segmented and yielded one at a time, so
memory holds at most ``context_frames`` previous frames whatever the clip's length. With
``context_frames=0`` the frames are independent and go through the batched path.

**Several objects** (a palette first-frame mask, as DAVIS annotations are, or ``objects=[ids]``): each
object runs as its own binary prompt (its pixels white on black) with the previous ``context_frames``
frames and *its* masks in them as context; in each frame the objects are merged per pixel by score,
a pixel going to the object with the highest score if that score is positive, else to the
background. The score is the object's painted brightness minus 127.5, which is proportional to the
difference of the ``-squared distance`` scores of white and black that ``return_scores`` gives, so a
pixel is an object's exactly where its binary result would be foreground. The merged map at the
model's resolution gives each object's context mask for the next frames; the result's ``mask`` holds
object ids (0 = background).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..config import check_count
from ..imaging.decode import InputError, describe, open_image, to_rgb_uint8
from ..imaging.masks import build_palette
from ..imaging.processor import resize_nearest
from ..nn.inputs import EMBEDDING_TYPES, ENSEMBLE_MODES
from .prompts import PromptPreparer, as_prompt
from .results import InputFailure, SegmentationResult, result_from_painted


def object_ids(mask: Any) -> list[int] | None:
    """The object ids of a palette (``P``-mode) mask: its non-zero indices, 255 (DAVIS' void) left out
    when other ids are present. ``None`` for any other mask (read as binary)."""
    if isinstance(mask, (str, os.PathLike)):
        try:
            with Image.open(os.fspath(mask)) as image:
                if image.mode not in ("P", "PA"):
                    return None
                indices = np.asarray(image.convert("P") if image.mode == "PA" else image)
        except (OSError, ValueError):
            return None  # the binary path reads it and names the problem
    elif isinstance(mask, Image.Image) and mask.mode in ("P", "PA"):
        indices = np.asarray(mask.convert("P") if mask.mode == "PA" else mask)
    else:
        return None
    ids = [int(i) for i in np.unique(indices) if i != 0]
    return [i for i in ids if i != 255] if len(ids) > 1 else ids


def object_map(mask: Any, *, what: str = "prompt mask") -> np.ndarray:
    """A mask of object ids as ``[H, W]`` int64: palette indices, grey values, or an integer array."""
    if isinstance(mask, (str, os.PathLike)):
        mask = open_image(mask)
    if isinstance(mask, Image.Image):
        if mask.mode in ("P", "PA"):
            return np.asarray(mask.convert("P") if mask.mode == "PA" else mask).astype(np.int64)
        if mask.mode in ("L", "I", "I;16", "I;16B", "I;16L", "1"):
            return np.asarray(mask).astype(np.int64)
        raise InputError(f"{what} ({describe(mask)}) is a colour picture; objects are read from a palette PNG "
                         "(as DAVIS annotations) or a grey map of object ids")
    array = np.asarray(mask)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise InputError(f"{what} ({describe(mask)}) must be a 2-D integer map of object ids")
    return array.astype(np.int64)


def segment_video(segmenter, frames: Iterable[Any], prompt: Any, *, context_frames: int = 0,
                  ensemble_mode: str = "original", embedding_type: str = "instance",
                  progress: Callable[[int, int | None], None] | None = None,
                  errors: str = "raise", objects: Sequence[int] | bool | None = None) -> Iterator[Any]:
    """One :class:`~seggpt_jax.inference.segmenter.SegmentationResult` per frame, in order (or an
    :class:`~seggpt_jax.inference.segmenter.InputFailure` for an unreadable frame with ``errors="return"``;
    it joins no context). Every frame runs with ``context_frames + 1`` prompt slots (per object); the
    first frames, which have fewer context frames, leave the rest unused (``prompt_valid``), which
    changes nothing in their answer, so the whole clip runs as one compiled program.

    ``objects``: ``None`` (default) reads a palette mask as objects (see :func:`object_ids`) and any
    other mask as binary; a list of ids segments those objects of an id map (palette indices, grey
    values or an integer array); ``False`` always reads the mask as binary. Binary: ``mask`` is bool;
    objects: ``mask`` holds object ids.
    """
    check_count("context_frames", context_frames, minimum=0)
    if ensemble_mode not in ENSEMBLE_MODES or embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"ensemble_mode must be one of {ENSEMBLE_MODES} and embedding_type one of {EMBEDDING_TYPES}")
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
    first = as_prompt(prompt)
    if first is None:
        raise ValueError("prompt must be an (image, mask) pair or a Prompt")
    ids = object_ids(first.mask) if objects is None and hasattr(first, "mask") else \
        (None if objects is False else [int(i) for i in objects])
    if ids is not None and ids:
        yield from _segment_objects(segmenter, frames, first, ids, context_frames=context_frames,
                                    ensemble_mode=ensemble_mode, instance=embedding_type == "instance",
                                    progress=progress, errors=errors)
        return
    if context_frames == 0:
        yield from segmenter.segment_iter(frames, first, binary=True, embedding_type=embedding_type,
                                          ensemble_mode=ensemble_mode, progress=progress, errors=errors)
        return
    processor = segmenter.processor
    first_image, first_mask = PromptPreparer(processor, None)(first)
    context: collections.deque = collections.deque(maxlen=context_frames)
    slots = context_frames + 1  # the first frame's prompt and K context frames: one program for every frame
    for index, query in _queries(segmenter, frames, errors):
        if isinstance(query, InputFailure):
            yield query
            continue
        pixels, size, source = query
        used = 1 + len(context)  # the first frames have fewer context frames: the rest of the slots are unused
        images = [first_image] + [c[0] for c in context] + [first_image] * (slots - used)
        masks = [first_mask] + [c[1] for c in context] + [first_mask] * (slots - used)
        painted = segmenter.paint_rows(np.stack([pixels] * slots), np.stack(images), np.stack(masks), embedding_type,
                                       prompts_per_query=slots, ensemble_mode=ensemble_mode,
                                       prompt_valid=np.arange(slots) < used)[0]  # [3, h, w] in [0, 255]
        context.append((pixels, _mask_input(processor, painted.mean(axis=0) > 128)))
        yield result_from_painted(painted, size, num_labels=None, source=source)
        if progress is not None:
            progress(index + 1, None)


def _segment_objects(segmenter, frames: Iterable[Any], first: Any, ids: list[int], *, context_frames: int,
                     ensemble_mode: str, instance: bool, progress: Callable[[int, int | None], None] | None,
                     errors: str) -> Iterator[Any]:
    """The multi-object procedure (module doc): one binary prompt per object, merged per pixel by score.
    Each object runs with ``context_frames + 1`` prompt slots, unused ones masked (one program)."""
    if len(set(ids)) != len(ids) or any(not 0 < i < 256 for i in ids):
        raise ValueError(f"object ids must be distinct and in 1..255, got {ids}")
    processor = segmenter.processor
    labels = object_map(first.mask)
    image = to_rgb_uint8(first.image, what="prompt image")
    first_pixels = processor(prompt_images=image, return_tensors="np")["prompt_pixel_values"][0]
    first_masks = [_mask_input(processor, labels == i) for i in ids]
    context: collections.deque = collections.deque(maxlen=context_frames)  # (pixels, [mask per object])
    colours = np.asarray(build_palette(max(ids)), np.uint8)
    id_array = np.asarray(ids, np.int64)
    slots = context_frames + 1
    per_forward = segmenter.queries_per_batch(slots)  # objects per forward
    for index, query in _queries(segmenter, frames, errors):
        if isinstance(query, InputFailure):
            yield query
            continue
        pixels, size, source = query
        used = 1 + len(context)
        valid = np.arange(slots) < used
        painted = []
        for start in range(0, len(ids), per_forward):
            objects = range(start, min(len(ids), start + per_forward))
            images, masks = [], []
            for k in objects:
                images += [first_pixels] + [c_pixels for c_pixels, _ in context] + [first_pixels] * (slots - used)
                masks += [first_masks[k]] + [c_masks[k] for _, c_masks in context] + [first_masks[k]] * (slots - used)
            rows = len(images)
            out = segmenter.paint_rows(np.stack([pixels] * rows), np.stack(images), np.stack(masks),
                                       "instance" if instance else "semantic", prompts_per_query=slots,
                                       ensemble_mode=ensemble_mode,
                                       prompt_valid=np.tile(valid, len(objects)) if slots > 1 else None)
            painted += [out[j * slots] for j in range(len(objects))]
        scores = np.stack([p.mean(axis=0) for p in painted]) - np.float32(127.5)  # [objects, h, w]
        best = scores.argmax(axis=0)
        merged = np.where(scores.max(axis=0) > 0, id_array[best], 0)  # [h, w] at the model's resolution
        if context_frames:
            context.append((pixels, [_mask_input(processor, merged == i) for i in ids]))
        small = merged.astype(np.uint8)
        yield SegmentationResult(mask=resize_nearest(small[None], size)[0], painted_small=colours[small],
                                 source=source)
        if progress is not None:
            progress(index + 1, None)


def _queries(segmenter, frames: Iterable[Any], errors: str) -> Iterator[tuple[int, Any]]:
    """``(index, (pixels, size, source))`` per frame, or ``(index, InputFailure)`` for an unreadable one
    (``errors="return"``)."""
    for index, frame in enumerate(frames):
        try:
            yield index, segmenter.prepare_query(frame)
        except (InputError, OSError) as e:
            if errors == "raise":
                raise
            yield index, InputFailure(index, None, str(e))


def _mask_input(processor, foreground: np.ndarray) -> np.ndarray:
    """A binary foreground as the prompt-mask model input (white on black)."""
    picture = np.repeat((foreground.astype(np.uint8) * 255)[..., None], 3, axis=-1)
    return processor(prompt_masks=picture, do_convert_rgb=False, return_tensors="np")["prompt_masks"][0]
