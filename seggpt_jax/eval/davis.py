"""DAVIS-2017 semi-supervised video object segmentation: J (region IoU), F (boundary F-measure) and J&F.

The definitions are those of the official evaluation (``davisvideochallenge/davis2017-evaluation``):

* **J** of one object in one frame: ``|P & G| / |P | G|``, 1 when both are empty.
* **F**: boundaries are one-pixel maps (a pixel is on the boundary when it differs from its right,
  lower or lower-right neighbour; the last row compares with the right neighbour only, the last
  column with the lower one, the corner is never a boundary); each boundary is dilated by a disk of
  radius ``ceil(0.008 * image diagonal)``; precision = predicted boundary pixels within the dilated
  true boundary / predicted boundary pixels, recall the other way; F = 2PR / (P + R), 0 when
  P + R = 0; an empty predicted boundary has precision 1, an empty true boundary recall 1.
* Per object, the frames scored are all but the first (the prompt) and the last; the object's J-Mean
  is the mean over them (``nanmean``), Recall the share above 0.5, Decay the mean of the first quarter
  minus the last. **J&F** is the mean of (the mean of the per-object J-Means, the mean of the
  per-object F-Means). In the semi-supervised task the void label 255 counts as background.

The layout (:class:`DavisDataset`): ``DAVIS/JPEGImages/480p/<seq>/*.jpg``,
``DAVIS/Annotations/480p/<seq>/*.png`` (palette PNGs of object ids), ``DAVIS/ImageSets/2017/val.txt``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from ..data.datasets import DataError
from ..inference.prompts import Prompt

BOUND_TH = 0.008


# ------------------------------------------------------------------------------------ J and F
def region_similarity(gt: np.ndarray, prediction: np.ndarray) -> float:
    """J: the IoU of two binary masks, 1 when both are empty."""
    gt, prediction = np.asarray(gt, bool), np.asarray(prediction, bool)
    if gt.shape != prediction.shape:
        raise ValueError(f"masks differ in shape: {gt.shape} and {prediction.shape}")
    union = np.count_nonzero(gt | prediction)
    return 1.0 if union == 0 else np.count_nonzero(gt & prediction) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a binary mask (see module doc), ``[H, W]`` bool."""
    seg = np.asarray(mask, bool)
    right = np.zeros_like(seg)
    below = np.zeros_like(seg)
    diagonal = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    below[:-1, :] = seg[1:, :]
    diagonal[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ right) | (seg ^ below) | (seg ^ diagonal)
    boundary[-1, :] = seg[-1, :] ^ right[-1, :]
    boundary[:, -1] = seg[:, -1] ^ below[:, -1]
    boundary[-1, -1] = False
    return boundary


def disk_offsets(radius: float) -> list[tuple[int, int]]:
    """``(dy, dx)`` with ``dy^2 + dx^2 <= radius^2``: the disk structuring element."""
    r = int(radius)
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= radius * radius]


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by a disk; pixels outside the image never contribute."""
    mask = np.asarray(mask, bool)
    out = np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    for dy, dx in disk_offsets(radius):
        y, x = ys + dy, xs + dx
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        out[y[inside], x[inside]] = True
    return out


def boundary_measure(gt: np.ndarray, prediction: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """F: the boundary F-measure of a predicted mask against the true one (see module doc)."""
    gt, prediction = np.asarray(gt, bool), np.asarray(prediction, bool)
    if gt.shape != prediction.shape:
        raise ValueError(f"masks differ in shape: {gt.shape} and {prediction.shape}")
    radius = bound_th if bound_th >= 1 else float(np.ceil(bound_th * np.linalg.norm(gt.shape)))  # as the official code
    predicted, true = boundary_map(prediction), boundary_map(gt)
    n_predicted, n_true = int(predicted.sum()), int(true.sum())
    if n_predicted == 0 and n_true == 0:
        precision = recall = 1.0
    elif n_predicted == 0:
        precision, recall = 1.0, 0.0
    elif n_true == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = np.count_nonzero(predicted & dilate(true, radius)) / n_predicted
        recall = np.count_nonzero(true & dilate(predicted, radius)) / n_true
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def statistics(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, recall, decay)`` of one object's per-frame values, as the official ``db_statistics``."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.nanmean(values))
    recall = float(np.nanmean(values > 0.5))
    ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.uint8)  # uint8, as the official code
    bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
    with np.errstate(invalid="ignore"):
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3])) if bins[0].size and bins[3].size else float("nan")
    return mean, recall, decay


@dataclasses.dataclass
class DavisMeter:
    """Per-object J and F over the scored frames of each sequence; :meth:`report` gives J&F."""

    j: dict = dataclasses.field(default_factory=dict)  # "seq_objectid" -> [J per frame]
    f: dict = dataclasses.field(default_factory=dict)

    def add(self, sequence: str, objects: Sequence[int], gt: np.ndarray, prediction: np.ndarray) -> None:
        """One scored frame: ``gt`` and ``prediction`` are ``[H, W]`` object-id maps (void already 0)."""
        for obj in objects:
            key = f"{sequence}_{obj}"
            self.j.setdefault(key, []).append(region_similarity(gt == obj, prediction == obj))
            self.f.setdefault(key, []).append(boundary_measure(gt == obj, prediction == obj))

    def start(self, sequence: str, objects: Sequence[int]) -> None:
        """Register a sequence's objects (an object of a sequence too short to score still counts)."""
        for obj in objects:
            self.j.setdefault(f"{sequence}_{obj}", [])
            self.f.setdefault(f"{sequence}_{obj}", [])

    def report(self) -> dict:
        j_stats = {k: statistics(v) for k, v in self.j.items()}
        f_stats = {k: statistics(v) for k, v in self.f.items()}
        with np.errstate(invalid="ignore"):
            jm, jr, jd = (float(np.mean([s[i] for s in j_stats.values()])) if j_stats else float("nan")
                          for i in range(3))
            fm, fr, fd = (float(np.mean([s[i] for s in f_stats.values()])) if f_stats else float("nan")
                          for i in range(3))
        return {"J&F-Mean": (jm + fm) / 2, "J-Mean": jm, "J-Recall": jr, "J-Decay": jd,
                "F-Mean": fm, "F-Recall": fr, "F-Decay": fd, "objects": len(j_stats),
                "per_object": {k: {"J": j_stats[k][0], "F": f_stats[k][0]} for k in j_stats}}


# ------------------------------------------------------------------------------------ the dataset
def read_annotation(path: str) -> np.ndarray:
    """A DAVIS annotation as ``[H, W]`` int64 object ids (palette indices), void (255) as 0."""
    try:
        with Image.open(path) as image:
            ids = np.asarray(image).astype(np.int64)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read annotation {path}: {e}") from None
    if ids.ndim != 2:
        raise DataError(f"{path}: a DAVIS annotation holds object ids (a palette PNG), got shape {ids.shape}")
    ids[ids == 255] = 0
    return ids


class DavisDataset:
    """The DAVIS-2017 layout: sequences of ``ImageSets/2017/<subset>.txt``, frames and annotations at
    ``resolution``."""

    def __init__(self, root: str | os.PathLike, *, subset: str = "val", resolution: str = "480p",
                 sequences: Sequence[str] | None = None):
        root = os.fspath(root)
        self.root = os.path.join(root, "DAVIS") if os.path.isdir(os.path.join(root, "DAVIS", "JPEGImages")) else root
        self.images = os.path.join(self.root, "JPEGImages", resolution)
        self.annotations = os.path.join(self.root, "Annotations", resolution)
        listing = os.path.join(self.root, "ImageSets", "2017", f"{subset}.txt")
        for path in (self.images, self.annotations, listing):
            if not os.path.exists(path):
                raise DataError(f"{root}: expected the DAVIS-2017 layout (JPEGImages/{resolution}, "
                                f"Annotations/{resolution}, ImageSets/2017/{subset}.txt); missing {path}")
        if sequences is None:
            with open(listing, encoding="utf-8") as f:
                sequences = [line.strip() for line in f if line.strip()]
        self.sequences = list(sequences)

    def frames(self, sequence: str) -> list[str]:
        folder = os.path.join(self.images, sequence)
        if not os.path.isdir(folder):
            raise DataError(f"images for sequence {sequence} not found ({folder})")
        return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".jpg"))

    def masks(self, sequence: str) -> list[str]:
        folder = os.path.join(self.annotations, sequence)
        if not os.path.isdir(folder):
            raise DataError(f"annotations for sequence {sequence} not found ({folder})")
        return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".png"))


# ------------------------------------------------------------------------------------ the protocol
def evaluate_davis(segmenter, dataset: DavisDataset, *, context_frames: int = 8, ensemble_mode: str = "original",
                   embedding_type: str = "instance",
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """The semi-supervised protocol: each sequence segmented from its first frame and annotation
    (every object a binary prompt, the previous ``context_frames`` predictions as context, objects
    merged per pixel by score), scored on all frames but the first and the last."""

    meter = DavisMeter()
    start = time.perf_counter()
    failures: dict[str, str] = {}
    frames_done = 0
    for number, sequence in enumerate(dataset.sequences):
        try:
            frames, masks = dataset.frames(sequence), dataset.masks(sequence)
            if len(frames) < 2 or not masks or len(masks) < len(frames):
                raise DataError(f"sequence {sequence}: {len(frames)} frames and {len(masks)} annotations "
                                "(every frame needs its annotation)")
            first = read_annotation(masks[0])
            objects = list(range(1, int(first.max()) + 1))
            local = DavisMeter()  # merged only when the whole sequence is scored
            local.start(sequence, objects)
            scored = frames[1:-1]  # the first is the prompt; the last is not scored
            if scored and objects:
                results = segmenter.segment_video(iter(scored), Prompt(frames[0], first), context_frames=context_frames,
                                                  ensemble_mode=ensemble_mode, embedding_type=embedding_type,
                                                  objects=objects)
                for result, mask_path in zip(results, masks[1:-1]):
                    gt = read_annotation(mask_path)
                    if gt.shape != result.mask.shape:
                        raise DataError(f"{mask_path} is {gt.shape[1]}x{gt.shape[0]} but its frame is "
                                        f"{result.mask.shape[1]}x{result.mask.shape[0]}")
                    local.add(sequence, objects, gt, result.mask)
            meter.j.update(local.j)
            meter.f.update(local.f)
            frames_done += len(scored)
        except DataError as e:
            failures[sequence] = str(e)
        if progress is not None:
            progress(number + 1, len(dataset.sequences))
    report = meter.report()
    report.update(sequences=len(dataset.sequences) - len(failures), frames_scored=frames_done,
                  failed_sequences=failures, seconds=round(time.perf_counter() - start, 2),
                  settings={"protocol": "davis", "context_frames": context_frames, "ensemble": ensemble_mode,
                            "embedding_type": embedding_type, "bound_th": BOUND_TH})
    return report
