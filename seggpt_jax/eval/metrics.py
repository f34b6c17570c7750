"""Segmentation metrics, with the conventions of the few-shot evaluation the SegGPT paper reports.

Metrics (the few-shot segmentation conventions of OSLSM / PFENet / HSNet, which the paper follows):

* **class IoU**: over all episodes of a class, ``sum(intersection) / sum(union)`` of its foreground;
  pixels marked ignored (PASCAL's 255 boundaries) count in neither.
* **mIoU**: the mean of class IoUs. A class of the fold that no episode scored (or whose union is 0)
  counts **0** with ``absent="zero"`` (HSNet: the mean runs over the fold's classes, each
  ``intersection / max(union, 1)``), or is left out with ``absent="skip"``.
* **FB-IoU**: the mean of foreground IoU and background IoU, each summed over all episodes.
* for class-id maps, :func:`confusion_matrix` gives per-class IoU the usual semantic-segmentation way.

The protocols that use them are in :mod:`seggpt_jax.eval.protocols`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np



def confusion_matrix(prediction: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore_index: int | None = None) -> np.ndarray:
    """``[num_classes, num_classes]`` counts, rows = target class, columns = predicted class."""
    prediction, target = np.asarray(prediction).astype(np.int64), np.asarray(target).astype(np.int64)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    keep = target != ignore_index if ignore_index is not None else np.ones(target.shape, bool)
    for name, values in (("prediction", prediction[keep]), ("target", target[keep])):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} has class ids outside 0..{num_classes - 1}: {np.unique(values)[:10]}")
    index = target[keep] * num_classes + prediction[keep]
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN where the class is in neither target nor prediction."""
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    values = iou_per_class(confusion)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


ABSENT_CLASSES = ("zero", "skip")


@dataclasses.dataclass
class FewShotMeter:
    """Accumulates binary episodes per class: class IoU, mIoU and FB-IoU.

    ``classes``: the fold's (or split's) classes; with ``absent="zero"`` the mIoU is their mean, a
    class without any union counting 0, as HSNet; with ``absent="skip"`` (default) it is the mean over
    the classes that have a union.
    """

    classes: list | None = None
    absent: str = "skip"
    intersection: dict = dataclasses.field(default_factory=dict)
    union: dict = dataclasses.field(default_factory=dict)
    fb_intersection: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2))
    fb_union: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2))
    episodes: int = 0

    def __post_init__(self) -> None:
        if self.absent not in ABSENT_CLASSES:
            raise ValueError(f"absent must be one of {ABSENT_CLASSES}, got {self.absent!r}")
        if self.absent == "zero" and self.classes is None:
            raise ValueError('absent="zero" needs the list of classes')

    def add(self, label: Any, prediction: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> None:
        prediction, target = np.asarray(prediction, bool), np.asarray(target, bool)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
        if self.classes is not None and label not in self.classes:
            raise ValueError(f"class {label!r} is not one of the meter's classes")
        if valid is not None:
            prediction, target = prediction[valid], target[valid]
        for k, (p, t) in enumerate(((~prediction, ~target), (prediction, target))):
            self.fb_intersection[k] += np.sum(p & t)
            self.fb_union[k] += np.sum(p | t)
        self.intersection[label] = self.intersection.get(label, 0) + int(np.sum(prediction & target))
        self.union[label] = self.union.get(label, 0) + int(np.sum(prediction | target))
        self.episodes += 1

    def class_iou(self) -> dict:
        """IoU of each class: NaN for a class without union (``skip``), 0 (``zero``, every class listed)."""
        labels = list(self.classes) if self.classes is not None else sorted(self.union, key=str)
        if self.absent == "skip":
            labels = [label for label in labels if label in self.union]
        out = {}
        for label in labels:
            union = self.union.get(label, 0)
            if union:
                out[label] = self.intersection[label] / union
            else:
                out[label] = 0.0 if self.absent == "zero" else float("nan")
        return out

    def report(self) -> dict:
        per_class = self.class_iou()
        values = [v for v in per_class.values() if not np.isnan(v)]
        with np.errstate(invalid="ignore", divide="ignore"):
            fb = np.where(self.fb_union > 0, self.fb_intersection / np.maximum(self.fb_union, 1), np.nan)
        return {"mIoU": float(np.mean(values)) if values else float("nan"),
                "FB-IoU": float(np.nanmean(fb)) if np.any(~np.isnan(fb)) else float("nan"),
                "episodes": self.episodes, "classes": len(per_class), "absent_classes": self.absent,
                "classes_scored": sum(1 for label in per_class if self.union.get(label, 0)),
                "class_IoU": {str(k): float(v) for k, v in per_class.items()}}
