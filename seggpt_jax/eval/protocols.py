"""The few-shot evaluation protocols the SegGPT paper reports, run through a :class:`~seggpt_jax.Segmenter`.

``fss1000`` (one-shot episodes within each FSS-1000 class folder), ``coco20i`` / ``pascal5i`` (episodes
over the classes of one fold in a folder of class-id masks; see :func:`seggpt_jax.data.fold_classes`),
and ``folder`` (every image of a folder segmented with fixed prompts, confusion-matrix mIoU).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..data import Dataset, Episode
from .metrics import FewShotMeter, confusion_matrix, iou_per_class, mean_iou


def evaluate_episodes(segmenter, dataset: Dataset, episodes: Sequence[Episode], *,
                      embedding_type: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Segment each episode's query from its supports (ensembled when several) and score it."""
    meter = FewShotMeter()
    start = time.perf_counter()
    batch = max(1, segmenter.batch_size)
    for offset in range(0, len(episodes), batch):
        chunk = episodes[offset:offset + batch]
        queries, prompts, targets, valids = [], [], [], []
        for episode in chunk:
            image, labels = dataset.load(dataset[episode.query])
            queries.append(image)
            targets.append(labels == episode.label)
            valids.append(labels != dataset.ignore_index if dataset.ignore_index is not None else None)
            supports = []
            for index in episode.supports:
                support_image, support_labels = dataset.load(dataset[index])
                supports.append((support_image, (support_labels == episode.label)))
            prompts.append(supports)
        results = segmenter.segment(queries, prompts=prompts, binary=True,
                                    embedding_type=embedding_type or "instance")
        for episode, result, target, valid in zip(chunk, results, targets, valids):
            meter.add(episode.group if dataset.num_labels is None else episode.label, result.mask, target, valid)
        if progress is not None:
            progress(min(offset + batch, len(episodes)), len(episodes))
    report = meter.report()
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def evaluate_folder(segmenter, dataset: Dataset, prompts: Any, *, num_labels: int | None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Every image segmented with the same prompts; confusion-matrix IoU per class, mIoU, FB-IoU."""
    classes = (num_labels or 1) + 1
    confusion = np.zeros((classes, classes), np.int64)
    meter = FewShotMeter()
    start = time.perf_counter()
    images = [dataset[i] for i in range(len(dataset))]
    for offset in range(0, len(images), segmenter.batch_size):
        chunk = images[offset:offset + segmenter.batch_size]
        loaded = [dataset.load(s) for s in chunk]
        results = segmenter.segment([image for image, _ in loaded], prompts=prompts, num_labels=num_labels,
                                    binary=num_labels is None)
        for (_, labels), result in zip(loaded, results):
            prediction = result.mask.astype(np.int64)
            confusion += confusion_matrix(prediction, labels, classes, dataset.ignore_index)
            valid = labels != dataset.ignore_index if dataset.ignore_index is not None else None
            meter.add(1, prediction > 0, labels > 0, valid)
        if progress is not None:
            progress(min(offset + segmenter.batch_size, len(images)), len(images))
    per_class = iou_per_class(confusion)
    return {"mIoU": mean_iou(confusion), "FB-IoU": meter.report()["FB-IoU"], "images": len(images),
            "class_IoU": {str(i): (None if np.isnan(v) else float(v)) for i, v in enumerate(per_class)},
            "seconds": round(time.perf_counter() - start, 2)}
