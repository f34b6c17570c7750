"""The SegGPT video procedure (``seggpt_engine.inference_video`` in the BAAI code), streamed.

Each frame is segmented with the first frame's prompt plus the last ``context_frames`` frames and
their binarised predictions (painted mean > 128) as extra prompts, feature-ensembled (the BAAI
ensemble by default, as its code does). Frames are read, segmented and yielded one at a time, so
memory holds at most ``context_frames`` previous frames whatever the clip's length. With
``context_frames=0`` the frames are independent and go through the batched path.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ..imaging.decode import InputError
from ..nn.inputs import EMBEDDING_TYPES, ENSEMBLE_MODES
from .prompts import PromptPreparer, as_prompt


def segment_video(segmenter, frames: Iterable[Any], prompt: Any, *, context_frames: int = 0,
                  ensemble_mode: str = "original", embedding_type: str = "instance",
                  progress: Callable[[int, int | None], None] | None = None,
                  errors: str = "raise") -> Iterator[Any]:
    """One binary :class:`~seggpt_jax.inference.segmenter.SegmentationResult` per frame, in order (or an
    :class:`~seggpt_jax.inference.segmenter.InputFailure` for an unreadable frame with ``errors="return"``;
    it joins no context). Every frame runs with ``context_frames + 1`` prompt slots; the first frames,
    which have fewer context frames, leave the rest unused (``prompt_valid``), which changes nothing in
    their answer, so the whole clip runs as one compiled program."""
    from .segmenter import InputFailure, result_from_painted

    if isinstance(context_frames, bool) or not isinstance(context_frames, int) or context_frames < 0:
        raise ValueError(f"context_frames must be a non-negative integer, got {context_frames!r}")
    if ensemble_mode not in ENSEMBLE_MODES or embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"ensemble_mode must be one of {ENSEMBLE_MODES} and embedding_type one of {EMBEDDING_TYPES}")
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
    first = as_prompt(prompt)
    if first is None:
        raise ValueError("prompt must be an (image, mask) pair or a Prompt")
    if context_frames == 0:
        yield from segmenter.segment_iter(frames, first, binary=True, embedding_type=embedding_type,
                                          ensemble_mode=ensemble_mode, progress=progress, errors=errors)
        return
    processor = segmenter.processor
    first_image, first_mask = PromptPreparer(processor, None)(first)
    context: collections.deque = collections.deque(maxlen=context_frames)
    slots = context_frames + 1  # the first frame's prompt and K context frames: one program for every frame
    for index, frame in enumerate(frames):
        try:
            pixels, size, source = segmenter.prepare_query(frame)
        except (InputError, OSError) as e:
            if errors == "raise":
                raise
            yield InputFailure(index, None, str(e))
            continue
        used = 1 + len(context)  # the first frames have fewer context frames: the rest of the slots are unused
        images = [first_image] + [c[0] for c in context] + [first_image] * (slots - used)
        masks = [first_mask] + [c[1] for c in context] + [first_mask] * (slots - used)
        painted = segmenter.paint_rows(np.stack([pixels] * slots), np.stack(images), np.stack(masks), embedding_type,
                                       prompts_per_query=slots, ensemble_mode=ensemble_mode,
                                       prompt_valid=np.arange(slots) < used)[0]  # [3, h, w] in [0, 255]
        foreground = painted.mean(axis=0) > 128
        picture = np.repeat((foreground.astype(np.uint8) * 255)[..., None], 3, axis=-1)
        context.append((pixels, processor(prompt_masks=picture, do_convert_rgb=False,
                                          return_tensors="np")["prompt_masks"][0]))
        yield result_from_painted(painted, size, num_labels=None, source=source)
        if progress is not None:
            progress(index + 1, None)
