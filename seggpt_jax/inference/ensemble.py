"""The spatial ensemble of the SegGPT paper (Section 3.3, Table 4a): k prompts tiled into one prompt.

"Multiple examples are concatenated in an n x n grid and then subsampled to the same size as a single
example." Here: ``n = ceil(sqrt(k))``; the prompt canvas (the model's prompt size, 448x448 for ViT-L)
is cut into ``n x n`` cells at ``floor(i * size / n)``; the i-th prompt fills cell ``(i // n, i % n)``,
its image resized bicubic (Pillow, as the processor resizes images) and its mask nearest; cells left
over (k not a square) are black in both. The canvas then goes to the model as one ordinary prompt, so
the query is painted in one forward whatever k, unlike the feature ensemble (k rows per query).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..imaging.decode import to_rgb_uint8
from ..imaging.masks import ColourMap, prompt_picture
from ..imaging.processor import SegGptImageProcessor
from .prompts import PromptPreparer, as_prompt


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    """A prompt already in model inputs: ``[3, h, w]`` normalised image and mask (accepted wherever
    prompts are, like one prompt of a learned prompt)."""

    prompt_pixel_values: np.ndarray
    prompt_masks: np.ndarray


def grid_cells(count: int, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """``(top, left, height, width)`` of the cell of each of ``count`` prompts on a canvas of ``size``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the spatial ensemble needs at least one prompt, got {count!r}")
    n = math.isqrt(count - 1) + 1  # ceil(sqrt(count))
    height, width = size
    rows = [i * height // n for i in range(n + 1)]
    cols = [i * width // n for i in range(n + 1)]
    cells = []
    for i in range(count):
        r, c = divmod(i, n)
        cells.append((rows[r], cols[c], rows[r + 1] - rows[r], cols[c + 1] - cols[c]))
    return cells


def spatial_canvas(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                   size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``[H, W, 3]`` uint8 image and mask pictures tiled into one ``size`` canvas each (see module doc)."""
    if len(images) != len(masks):
        raise ValueError(f"got {len(images)} images and {len(masks)} masks")
    height, width = size
    image_canvas = np.zeros((height, width, 3), np.uint8)
    mask_canvas = np.zeros((height, width, 3), np.uint8)
    for (top, left, h, w), image, mask in zip(grid_cells(len(images), size), images, masks):
        if h == 0 or w == 0:
            continue
        image_canvas[top:top + h, left:left + w] = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC,
                                                                                           reducing_gap=None))
        mask_canvas[top:top + h, left:left + w] = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return image_canvas, mask_canvas


def spatial_prompt(prompts: Sequence[Any], processor: SegGptImageProcessor, *, num_labels: int | None = None,
                   colour_map: ColourMap | Mapping | str | None = None) -> PreparedPrompt:
    """Several ``(image, mask)`` prompts as one spatial-ensemble prompt, ready for
    :meth:`~seggpt_jax.Segmenter.segment` (masks read by the one mask rule: binary levels, or class ids
    painted with the palette when ``num_labels`` is given).

        segmenter.segment(query, prompts=spatial_prompt(pairs, segmenter.processor))
    """
    images, masks = [], []
    for i, value in enumerate(prompts):
        prompt = as_prompt(value)
        if prompt is None or not hasattr(prompt, "image"):
            raise ValueError(f"prompt {i} is not an (image, mask) pair")
        images.append(to_rgb_uint8(prompt.image, what=f"prompt image {i}"))
        masks.append(prompt_picture(prompt.mask, num_labels, colour_map=colour_map, what=f"prompt mask {i}"))
    size = (processor.size["height"], processor.size["width"])
    image, mask = spatial_canvas(images, masks, size)
    out = processor(prompt_images=image, prompt_masks=mask, do_convert_rgb=False, return_tensors="np")
    return PreparedPrompt(out["prompt_pixel_values"][0], out["prompt_masks"][0])


def paint_queries(segmenter, items: Sequence[tuple[np.ndarray, list[Any]]], *, ensemble_mode: str = "original",
                  instance: bool = True, pad: bool = True) -> list[np.ndarray]:
    """Queries already in model inputs, each with its prompts (pairs or prepared prompts, the same count
    for all): the painted ``[3, h, w]`` answers (``[0, 255]``), ``segmenter.batch_size`` rows per forward
    (:meth:`~seggpt_jax.Segmenter.paint_batch`; with ``pad``, a last short batch padded to the full one
    on accelerators, as the Segmenter does)."""
    if not items:
        return []
    count = len(items[0][1])
    per_forward = segmenter.queries_per_batch(count)
    preparer = PromptPreparer(segmenter.processor, None)
    out: list[np.ndarray] = []
    for offset in range(0, len(items), per_forward):
        chunk = items[offset:offset + per_forward]
        rows = [(pixels, *preparer(prompt)) for pixels, prompts in chunk for prompt in prompts]
        target = per_forward * count if pad and segmenter.pad_batches else None
        out += list(segmenter.paint_batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                                          np.stack([r[2] for r in rows]), np.full(len(rows), instance),
                                          prompts_per_query=count, ensemble_mode=ensemble_mode, rows=target))
    return out
