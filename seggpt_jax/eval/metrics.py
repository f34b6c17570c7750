"""Segmentation metrics, with the conventions of the few-shot evaluation the SegGPT paper reports.

Metrics (the few-shot segmentation conventions of OSLSM / PFENet / HSNet, which the paper follows):

* **class IoU**: over all episodes of a class, ``sum(intersection) / sum(union)`` of its foreground;
  **mIoU** is the mean over classes that occur (a class that never occurs in prediction or target
  has no IoU and is left out, not counted as 0 or 1).
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


@dataclasses.dataclass
class FewShotMeter:
    """Accumulates binary episodes per class: class IoU, mIoU and FB-IoU."""

    intersection: dict = dataclasses.field(default_factory=dict)
    union: dict = dataclasses.field(default_factory=dict)
    fb_intersection: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2))
    fb_union: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2))
    episodes: int = 0

    def add(self, label: Any, prediction: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> None:
        prediction, target = np.asarray(prediction, bool), np.asarray(target, bool)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
        if valid is not None:
            prediction, target = prediction[valid], target[valid]
        for k, (p, t) in enumerate(((~prediction, ~target), (prediction, target))):
            self.fb_intersection[k] += np.sum(p & t)
            self.fb_union[k] += np.sum(p | t)
        self.intersection[label] = self.intersection.get(label, 0) + int(np.sum(prediction & target))
        self.union[label] = self.union.get(label, 0) + int(np.sum(prediction | target))
        self.episodes += 1

    def class_iou(self) -> dict:
        return {label: (self.intersection[label] / self.union[label]) if self.union[label] else float("nan")
                for label in sorted(self.union, key=str)}

    def report(self) -> dict:
        per_class = self.class_iou()
        values = [v for v in per_class.values() if not np.isnan(v)]
        with np.errstate(invalid="ignore", divide="ignore"):
            fb = np.where(self.fb_union > 0, self.fb_intersection / np.maximum(self.fb_union, 1), np.nan)
        return {"mIoU": float(np.mean(values)) if values else float("nan"),
                "FB-IoU": float(np.nanmean(fb)) if np.any(~np.isnan(fb)) else float("nan"),
                "episodes": self.episodes, "classes": len(per_class),
                "class_IoU": {str(k): float(v) for k, v in per_class.items()}}
