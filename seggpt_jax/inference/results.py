"""What segmenting a query gives: its :class:`SegmentationResult` (or an :class:`InputFailure`), and the
one rule that turns the painted answer into it (:func:`result_from_painted`)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ..imaging.masks import build_palette
from ..imaging.processor import nearest_colours, resize_nearest, smallest_uint


@dataclasses.dataclass
class SegmentationResult:
    """The answer for one query, at the query's original size ``(height, width)``.

    Attributes:
        mask: ``[H, W]`` bool foreground (binary mode) or class ids ``0..num_labels`` (semantic mode;
            uint8, or uint16 beyond 255 labels).
        scores: ``[num_labels + 1, H, W]`` float32 ``-squared distance`` of each pixel's colour to
            each class colour (higher is closer), when requested.
        source: the query's path, when it was given as one.
        painted: ``[H, W, 3]`` uint8: the colours the model painted (the raw answer), made at full size
            when first read (:attr:`painted_small` is the model's own resolution).
    """

    mask: np.ndarray
    painted_small: np.ndarray  # [h, w, 3] uint8 at the model's resolution
    scores: np.ndarray | None = None
    source: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    @property
    def painted(self) -> np.ndarray:
        return resize_nearest(self.painted_small.transpose(2, 0, 1), self.size).transpose(1, 2, 0)


def result_from_painted(picture: np.ndarray, size: tuple[int, int], *, num_labels: int | None,
                        return_scores: bool = False, source: str | None = None) -> SegmentationResult:
    """A painted ``[3, h, w]`` answer in ``[0, 255]`` -> the query's :class:`SegmentationResult` at ``size``.

    Each pixel takes the class of the nearest palette colour (binary: black or white), decided at the
    model's resolution and then resized with torch's nearest rule (the two commute, so this equals
    transformers' post-processing, which resizes first). Only the answer's own dtype (bool, or the
    smallest unsigned integer for the classes) is made at full size.
    """
    palette = _palette(1 if num_labels is None else num_labels)
    index, distance = nearest_colours(picture, palette, distances=return_scores)
    classes = index.astype(smallest_uint(len(palette)))
    small = classes == 1 if num_labels is None else classes
    mask = resize_nearest(small[None], size)[0]
    scores = resize_nearest(-distance, size) if return_scores else None
    return SegmentationResult(mask=mask, painted_small=np.ascontiguousarray(
        picture.astype(np.uint8).transpose(1, 2, 0)), scores=scores, source=source)


@dataclasses.dataclass(frozen=True)
class InputFailure:
    """A query that could not be read (``errors="return"``): its position, its path, and why."""

    index: int
    source: str | None
    message: str


@functools.lru_cache(maxsize=64)
def _palette(num_labels: int) -> np.ndarray:
    palette = np.asarray(build_palette(num_labels), dtype=np.float32)
    palette.flags.writeable = False  # shared by every call
    return palette
