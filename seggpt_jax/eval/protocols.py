"""The evaluation protocols the SegGPT paper reports, run through a :class:`~seggpt_jax.Segmenter`.

Few-shot (:class:`FewShotSettings`, :func:`prepare_few_shot`, :func:`run_few_shot`):

* ``fss1000``: FSS-1000, the classes of one split (the 240 test classes by default);
* ``pascal5i`` / ``coco20i``: one fold of PASCAL-5i / COCO-20i;

with HSNet's episodes (``sampling="hsnet"``, the standard protocol, in HSNet's layouts and with its
split lists) or every (image, class) pair (``sampling="all-pairs"``: FSS-1000 class folders, or a
``DATA/images`` + ``DATA/masks`` folder of class-id masks). Several supports are combined by the
feature ensemble (``"original"``: BAAI's, the default; ``"transformers"``) or tiled into one prompt
(``"spatial"``, the paper's Table 4a). Prediction is the nearest palette colour (``threshold=None``)
or painted brightness above ``threshold``; scoring at the query's own size or, as HSNet without
``--use_original_imgsize``, at ``eval_size x eval_size`` (both resized with torch's nearest rule).

``folder``: every image of a folder segmented with fixed prompts, confusion-matrix mIoU
(:func:`evaluate_folder`). ``davis``: DAVIS-2017 semi-supervised J&F (:mod:`seggpt_jax.eval.davis`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import parallel
from ..config import check_count
from ..data import Dataset, Episode
from ..data.benchmarks import (BAD_SAMPLE_POLICIES, HSNET_EPISODES, CocoBenchmark, FSS1000Benchmark,
                               PascalBenchmark, Screened, screen_episodes)
from ..data.datasets import Problem, resize_labels
from ..data.episodes import class_episodes, fold_classes, sample_episodes
from ..data.loader import Prefetcher
from ..data.splits import FSS_SPLITS, HsnetSplits
from ..imaging.decode import InputError
from ..nn.inputs import default_embedding_type
from ..imaging.processor import resize_nearest
from ..inference.ensemble import paint_queries, spatial_prompt
from ..inference.prompts import Prompt
from ..inference.results import result_from_painted
from .metrics import ABSENT_CLASSES, FewShotMeter, confusion_matrix, iou_per_class, mean_iou

FEW_SHOT_PROTOCOLS = ("fss1000", "pascal5i", "coco20i")
SAMPLINGS = ("hsnet", "all-pairs")
EVAL_ENSEMBLES = ("original", "transformers", "spatial")


# ------------------------------------------------------------------------------------ scoring
def painted_foreground(painted: np.ndarray, size: tuple[int, int], threshold: float | None = None) -> np.ndarray:
    """A painted ``[3, h, w]`` answer (``[0, 255]``) -> ``[H, W]`` bool at ``size`` (torch nearest): with
    ``threshold=None`` the mask :meth:`Segmenter.segment` returns for it (the one rule,
    :func:`~seggpt_jax.inference.results.result_from_painted`: the nearest of black and white), else mean
    brightness ``/ 255 > threshold``."""
    if threshold is None:
        return result_from_painted(painted, size, num_labels=None).mask
    return resize_nearest((painted.mean(axis=0) > np.float32(threshold * 255))[None], size)[0]


@dataclasses.dataclass
class _Loaded:
    episode: Episode
    query: np.ndarray | None = None
    labels: np.ndarray | None = None
    supports: list = dataclasses.field(default_factory=list)
    problem: Problem | None = None


def evaluate_episodes(segmenter, dataset: Dataset, episodes: Sequence[Episode], *,
                      embedding_type: str | None = None, ensemble: str | None = None, threshold: float | None = None,
                      eval_size: int | None = None, classes: Sequence | None = None, absent: str = "skip",
                      fit_masks: bool = False,
                      progress: Callable[[int, int], None] | None = None, merge: bool = False) -> dict:
    """Segment each episode's query from its supports and score it (see module doc).

    ``ensemble``: ``None`` (the segmenter's feature ensemble), ``"original"``, ``"transformers"`` or
    ``"spatial"``. ``classes`` / ``absent``: see :class:`~seggpt_jax.eval.metrics.FewShotMeter`.
    ``fit_masks``: masks of another size than their image are resized to it (nearest). An episode
    whose files cannot be decoded is left out and named in ``report["unreadable"]``.
    """

    ensemble = ensemble or segmenter.ensemble_mode
    if ensemble not in EVAL_ENSEMBLES:
        raise ValueError(f"ensemble must be one of {EVAL_ENSEMBLES}, got {ensemble!r}")
    if embedding_type not in (None, "instance", "semantic"):
        raise ValueError(f"embedding_type must be 'instance' or 'semantic', got {embedding_type!r}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if eval_size is not None:
        check_count("eval_size", eval_size)
    instance = (embedding_type or default_embedding_type(None)) == "instance"
    meter = FewShotMeter(classes=list(classes) if classes is not None else None, absent=absent)
    start = time.perf_counter()
    shots = max((len(e.supports) for e in episodes), default=1)
    per_forward = segmenter.queries_per_batch(1 if ensemble == "spatial" else shots)
    chunks = [list(episodes[i:i + per_forward]) for i in range(0, len(episodes), per_forward)]
    unreadable: list[Problem] = []

    def load(step: int) -> list[_Loaded]:
        out = []
        for episode in chunks[step]:
            item = _Loaded(episode)
            sample = dataset[episode.query]
            try:
                image, labels = dataset.load(sample, fit_mask=fit_masks)
                item.query, item.labels = segmenter.prepare_query(image)[0], labels
                pairs = []
                for index in episode.supports:
                    sample = dataset[index]
                    support_image, support_labels = dataset.load(sample, fit_mask=fit_masks)
                    pairs.append(Prompt(support_image, support_labels == episode.label))
                item.supports = [spatial_prompt(pairs, segmenter.processor)] if ensemble == "spatial" else pairs
            except InputError as e:
                item.problem = Problem(sample.image, " ".join(str(e).split()), None)
            out.append(item)
        return out

    done = 0
    for step, loaded in enumerate(Prefetcher(load, 0, len(chunks), depth=2, workers=2)):
        good = [item for item in loaded if item.problem is None]
        unreadable += [item.problem for item in loaded if item.problem is not None]
        if good:
            painted = paint_queries(segmenter, [(item.query, item.supports) for item in good],
                                    ensemble_mode="original" if ensemble == "spatial" else ensemble,
                                    instance=instance, pad=step > 0)
            for item, picture in zip(good, painted):
                labels = item.labels
                if eval_size is not None:
                    labels = resize_labels(labels, (eval_size, eval_size))
                prediction = painted_foreground(picture, labels.shape[:2], threshold)
                valid = labels != dataset.ignore_index if dataset.ignore_index is not None else None
                key = item.episode.group if dataset.num_labels is None else item.episode.label
                meter.add(key, prediction, labels == item.episode.label, valid)
        done += len(loaded)
        if progress is not None:
            progress(done, len(episodes))
    unreadable_entries = [{"file": p.path, "problem": p.text, "action": "episode skipped"} for p in unreadable]
    if merge:  # every process of a jax.distributed job: sum the scores of all of them
        parts = parallel.all_gather_json("few-shot scores", {
            "intersection": [[repr(k), v] for k, v in meter.intersection.items()],
            "union": [[repr(k), v] for k, v in meter.union.items()],
            "fb_intersection": meter.fb_intersection.tolist(), "fb_union": meter.fb_union.tolist(),
            "episodes": meter.episodes, "unreadable": unreadable_entries})
        keys = {repr(k): k for k in (meter.classes or [])} | {repr(k): k for k in meter.union}
        meter = FewShotMeter(classes=meter.classes, absent=meter.absent)
        unreadable_entries = []
        for part in parts:
            for name, field in (("intersection", meter.intersection), ("union", meter.union)):
                for key, value in part[name]:
                    label = keys.get(key, key)
                    field[label] = field.get(label, 0) + value
            meter.fb_intersection += np.asarray(part["fb_intersection"])
            meter.fb_union += np.asarray(part["fb_union"])
            meter.episodes += part["episodes"]
            unreadable_entries += part["unreadable"]
    report = meter.report()
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["unreadable"] = unreadable_entries
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


# ------------------------------------------------------------------------------------ few-shot runs
@dataclasses.dataclass
class FewShotSettings:
    """Everything that defines a few-shot run's episodes and scoring (recorded in its report).

    ``absent_classes=None``: ``zero`` with HSNet's sampling (as HSNet), ``skip`` otherwise.
    ``ensemble=None``: ``original`` (BAAI's feature ensemble, as the paper ran it).
    ``folder_dataset``: the dataset for ``all-pairs`` on PASCAL-5i/COCO-20i (a folder of class-id masks).
    """

    protocol: str
    data: str
    shots: int = 1
    fold: int = 0
    sampling: str = "hsnet"
    fss_split: str = "test"
    splits: str | None = None
    episodes: int | None = None
    seed: int = 0
    on_bad_sample: str = "resize"
    ensemble: str | None = None
    embedding_type: str = "instance"
    threshold: float | None = None
    absent_classes: str | None = None
    eval_size: int | None = None
    folder_dataset: Dataset | None = None
    episodes_per_fold: int = HSNET_EPISODES  # PASCAL-5i/COCO-20i with HSNet's sampling; fewer is not the protocol

    def __post_init__(self) -> None:
        checks = (("protocol", self.protocol, FEW_SHOT_PROTOCOLS), ("sampling", self.sampling, SAMPLINGS),
                  ("fss_split", self.fss_split, (*FSS_SPLITS, "all")),
                  ("on_bad_sample", self.on_bad_sample, BAD_SAMPLE_POLICIES),
                  ("ensemble", self.ensemble, (None, *EVAL_ENSEMBLES)),
                  ("embedding_type", self.embedding_type, ("instance", "semantic")),
                  ("absent_classes", self.absent_classes, (None, *ABSENT_CLASSES)))
        for name, value, choices in checks:
            if value not in choices:
                raise ValueError(f"{name} must be one of {tuple(c for c in choices if c is not None)}, got {value!r}")
        if self.sampling == "hsnet":
            if self.episodes is not None:
                raise ValueError("HSNet's protocol has a fixed number of episodes (FSS-1000: every image of the "
                                 "split; PASCAL-5i and COCO-20i: 1000 per fold); a subset via episodes= needs "
                                 "sampling='all-pairs'")
            if self.protocol != "fss1000" and self.splits is None:
                raise ValueError(f"{self.protocol} with HSNet's episodes needs HSNet's split lists: pass splits= "
                                 "(evaluate --splits DIR), a checkout of juhongm999/hsnet's data/splits")
        if self.protocol != "fss1000" and self.fold not in (0, 1, 2, 3):
            raise ValueError(f"{self.protocol} has folds 0..3, got {self.fold}")

    @property
    def absent(self) -> str:
        return self.absent_classes or ("zero" if self.sampling == "hsnet" else "skip")

    def to_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "folder_dataset"}
        if self.protocol == "fss1000" or self.sampling != "hsnet":
            del out["episodes_per_fold"]
        out.update(ensemble=self.ensemble or "original", absent_classes=self.absent,
                   threshold=self.threshold if self.threshold is not None else "nearest palette colour (0.5)")
        return out


@dataclasses.dataclass
class PreparedRun:
    """A few-shot run's dataset, episodes (bad samples screened) and scored classes; no model involved."""

    settings: FewShotSettings
    dataset: Dataset
    screened: Screened
    classes: list
    splits_verified: dict

    @property
    def episodes(self) -> list[Episode]:
        return self.screened.episodes


def prepare_few_shot(settings: FewShotSettings, workers: int = 4) -> PreparedRun:
    """Find the data, draw the episodes and screen every file they use (reads masks, not images)."""
    s = settings
    unreadable: list[Problem] = []
    splits = HsnetSplits(s.splits) if s.splits is not None else None
    if s.protocol == "fss1000":
        dataset = FSS1000Benchmark(s.data, split=s.fss_split)
        classes = list(dataset.classes)
        episodes = dataset.hsnet_episodes(s.shots, seed=s.seed) if s.sampling == "hsnet" else \
            sample_episodes(dataset, shots=s.shots, seed=s.seed, max_episodes=s.episodes)
    elif s.sampling == "hsnet":
        dataset = (PascalBenchmark if s.protocol == "pascal5i" else CocoBenchmark)(s.data, splits, s.fold)
        classes = list(dataset.classes)
        episodes = dataset.hsnet_episodes(s.shots, seed=s.seed, count=s.episodes_per_fold)
    else:
        if s.folder_dataset is None:
            raise ValueError(f"all-pairs {s.protocol} runs on a folder of class-id masks: pass folder_dataset=")
        dataset = s.folder_dataset
        classes = fold_classes(s.protocol, s.fold)
        episodes = class_episodes(dataset, classes, shots=s.shots, seed=s.seed, max_episodes=s.episodes,
                                  unreadable=unreadable)
    screened = screen_episodes(dataset, episodes, s.on_bad_sample, workers=workers)
    screened.problems = unreadable + screened.problems
    return PreparedRun(s, dataset, screened, classes, dict(splits.verified) if splits else {})


def run_few_shot(segmenter, prepared: PreparedRun,
                 progress: Callable[[int, int], None] | None = None, *, process: tuple[int, int] = (0, 1)) -> dict:
    """Evaluate a prepared run; the report holds the metrics, the settings and every bad sample.

    ``process=(index, count)``: the processes of a ``jax.distributed`` job each evaluate every
    ``count``-th episode (from ``index``) on their own devices, and the scores are summed over all of
    them (a collective: every process calls this); every process returns the whole run's report."""
    s = prepared.settings
    if not prepared.episodes:
        raise ValueError(f"no episodes to evaluate in {s.data} ({prepared.screened.skipped} skipped for bad "
                         f"samples)")
    index, count = process
    mine = prepared.episodes[index::count]
    report = evaluate_episodes(segmenter, prepared.dataset, mine, embedding_type=s.embedding_type,
                               ensemble=s.ensemble or "original", threshold=s.threshold, eval_size=s.eval_size,
                               classes=prepared.classes, absent=s.absent, fit_masks=s.on_bad_sample == "resize",
                               progress=progress, merge=count > 1)
    screened = prepared.screened.to_json()
    for entry in report.pop("unreadable"):  # found only when decoding (a truncated image, say)
        screened["bad_samples"].append(entry)
        screened["skipped_episodes"] += 1
    report.update(settings=s.to_json(), splits_sha256=prepared.splits_verified, **screened)
    return report
