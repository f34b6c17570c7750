"""The standard few-shot benchmarks in the layouts HSNet (``juhongm999/hsnet``) documents, with its
episodes, its way of reading masks, and a policy for the datasets' defective files.

Layouts (DATA may be the folder named here or its parent):

* FSS-1000: ``FSS-1000/<class>/<n>.jpg`` with ``<n>.png`` (binary masks, read as HSNet reads them:
  grey level >= 128 is foreground). :class:`FSS1000Benchmark`.
* PASCAL-5i: ``VOC2012/JPEGImages/<name>.jpg`` with ``VOC2012/SegmentationClassAug/<name>.png`` (class
  ids 0..20, 255 on object boundaries, which the metric skips). :class:`PascalBenchmark`.
* COCO-20i: ``COCO2014/{train2014,val2014}/<name>.jpg`` with per-image masks
  ``COCO2014/annotations/{train2014,val2014}/<name>.png`` (class ids 1..80 in category-id order, 0
  background). :class:`CocoBenchmark`.

Bad samples (the known defects of FSS-1000: masks of another size than their image, an RGB photo
stored as a mask, a non-binary mask, missing files) are found by :func:`screen_episodes`, which reads
the masks and the images' headers only, and are handled by a policy: ``resize`` (default) uses them the
way HSNet effectively does (a mask resized to its image, any mask thresholded at grey 128), ``skip``
drops every episode that uses one, ``fail`` stops before anything runs. Files that cannot be read at
all are skipped under every policy. Each bad file is reported once, by name.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from ..imaging.decode import InputError, open_image
from .datasets import DataError, Dataset, Problem, Sample, _listing
from .episodes import Episode, fold_classes, hsnet_coco_stream, hsnet_fss_stream, hsnet_pascal_stream
from .splits import FSS_SPLITS, HsnetSplits, fss1000_classes

BAD_SAMPLE_POLICIES = ("resize", "skip", "fail")
HSNET_EPISODES = 1000  # PASCAL-5i and COCO-20i: episodes per fold at test time


def _inside(root: str, name: str, *required: str) -> str:
    """``root/name`` when it exists (DATA is the parent), else ``root``; it must hold ``required``."""
    root = os.fspath(root)
    folder = os.path.join(root, name) if os.path.isdir(os.path.join(root, name)) else root
    missing = [r for r in required if not os.path.isdir(os.path.join(folder, r))]
    if not os.path.isdir(folder) or missing:
        wanted = ", ".join(f"{name}/{r}" for r in required) if required else name
        raise DataError(f"{root}: expected the {name} layout ({wanted}); missing {', '.join(missing) or name}")
    return folder


def _colour_fraction(rgb: np.ndarray) -> float:
    spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1)
    return float(np.mean(spread > 16))


# ------------------------------------------------------------------------------------ FSS-1000
def hsnet_jpgs(folder: str) -> list[str]:
    """The image files HSNet takes from a class folder: names whose part after the first dot is ``jpg``
    (so ``.jpeg`` and ``.JPG`` strays are left out), hidden files excluded, sorted."""
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise DataError(f"cannot list {folder}: {e.strerror or e}") from None
    return sorted(n for n in names if not n.startswith(".") and len(n.split(".")) > 1 and n.split(".")[1] == "jpg")


class FSS1000Benchmark(Dataset):
    """FSS-1000 as HSNet reads it: the classes of ``split`` (``test``: the 240 official test classes;
    ``val``/``trn``: HSNet's split of the others; ``all``: every class folder), each class's ``.jpg``
    files, masks ``<stem>.png`` read as ``grey >= 128``."""

    name = "fss1000"

    def __init__(self, root: str | os.PathLike, *, split: str = "test"):
        if split not in (*FSS_SPLITS, "all"):
            raise ValueError(f"FSS-1000 split must be one of {(*FSS_SPLITS, 'all')}, got {split!r}")
        self.root = _inside(root, "FSS-1000")
        self.split = split
        folders = sorted(d for d in os.listdir(self.root) if not d.startswith(".")
                         and os.path.isdir(os.path.join(self.root, d)))
        if split == "all":
            classes = folders
        else:
            classes = fss1000_classes(split)
            missing = sorted(set(classes) - set(folders))
            if missing:
                raise DataError(_listing(f"{self.root}: {len(missing)} of the {len(classes)} FSS-1000 {split} classes "
                                         f"are missing (--fss-split all evaluates whatever class folders there are)",
                                         missing))
        if not classes:
            raise DataError(f"{self.root}: no class folders")
        self.classes = sorted(classes)
        self.samples, self._index = [], {}
        self.files = {name: hsnet_jpgs(os.path.join(self.root, name)) for name in self.classes}
        for name in self.classes:
            for file in self.files[name]:
                self._sample(name, file)
        self._listed = len(self.samples)

    def _sample(self, group: str, file: str) -> int:
        key = (group, file)
        if key not in self._index:
            stem = file.split(".")[0]
            folder = os.path.join(self.root, group)
            self._index[key] = len(self.samples)
            self.samples.append(Sample(os.path.join(folder, file), os.path.join(folder, stem + ".png"), group,
                                       f"{group}/{file}"))
        return self._index[key]

    def groups(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, sample in enumerate(self.samples[:self._listed]):
            out.setdefault(sample.group, []).append(i)
        return out

    def hsnet_episodes(self, shots: int, seed: int = 0) -> list[Episode]:
        """HSNet's episodes (see :func:`~seggpt_jax.data.episodes.hsnet_fss_stream`); a drawn support
        that does not exist becomes a sample that :func:`screen_episodes` reports as missing."""
        stream = hsnet_fss_stream(self.files, shots, seed)
        return [Episode(self._index[(group, query)], tuple(self._sample(group, s) for s in supports), 1, group, i)
                for i, (group, query, supports) in enumerate(stream)]

    def read_mask(self, sample: Sample) -> tuple[np.ndarray, list[Problem]]:
        mask = open_image(sample.mask)
        notes = []
        if mask.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "P") and \
                _colour_fraction(np.asarray(mask.convert("RGB"))) > 0.005:
            notes.append(Problem(sample.mask, "is a colour picture, not a binary mask",
                                 "read as HSNet does: grey >= 128 is foreground"))
        grey = np.asarray(mask.convert("L"))
        if not notes:
            levels = np.unique(grey)
            if not np.isin(levels, (0, 255)).all():
                notes.append(Problem(sample.mask, f"is not binary ({len(levels)} grey levels)",
                                     "read as HSNet does: grey >= 128 is foreground"))
        return (grey >= 128).astype(np.int64), notes


# ------------------------------------------------------------------------------------ PASCAL-5i, COCO-20i
class _ClassIdBenchmark(Dataset):
    """Masks of class ids, read as HSNet reads them (the PNG's values as they are)."""

    name: str
    classes: list[int]

    def _init_samples(self) -> None:
        self.samples, self._index = [], {}

    def _sample(self, name: str) -> int:
        if name not in self._index:
            self._index[name] = len(self.samples)
            self.samples.append(Sample(*self._paths(name), "", name))
        return self._index[name]

    def _paths(self, name: str) -> tuple[str, str]:
        raise NotImplementedError

    def _episodes(self, stream) -> list[Episode]:
        return [Episode(self._sample(query), tuple(self._sample(s) for s in supports), label, str(label), i)
                for i, (label, query, supports) in enumerate(stream)]

    def read_mask(self, sample: Sample) -> tuple[np.ndarray, list[Problem]]:
        mask = open_image(sample.mask)
        if mask.mode in ("P", "L", "I;16", "I;16B", "I;16L", "I"):
            labels = np.asarray(mask).astype(np.int64)
        else:
            rgb = np.asarray(mask.convert("RGB"))
            if _colour_fraction(rgb) > 0:
                raise InputError(f"{sample.mask} is a colour picture, not a mask of class ids (PASCAL: use "
                                 f"SegmentationClassAug, whose PNGs hold the ids)")
            labels = rgb[..., 0].astype(np.int64)
        notes = []
        stray = np.unique(labels[(labels > self.num_labels) & (labels != 255)])
        if stray.size:
            notes.append(Problem(sample.mask, f"has values {stray[:5].tolist()} that are no class id "
                                              f"0..{self.num_labels} (nor 255)",
                                 "read as HSNet does: such pixels belong to no class"))
        return labels, notes


class PascalBenchmark(_ClassIdBenchmark):
    """PASCAL-5i fold ``fold`` (classes ``5 fold + 1 .. 5 fold + 5``) as HSNet evaluates it."""

    name = "pascal5i"
    num_labels = 20
    ignore_index = 255

    def __init__(self, root: str | os.PathLike, splits: HsnetSplits, fold: int):
        self.root = _inside(root, "VOC2012", "JPEGImages", "SegmentationClassAug")
        self.fold, self.splits = fold, splits
        self.classes = fold_classes("pascal5i", fold)
        self.fold_list = splits.pascal_fold(fold)
        strays = sorted({label for _, label in self.fold_list} - set(self.classes))
        if strays:
            raise DataError(f"pascal/val/fold{fold}.txt lists classes {strays} outside fold {fold}")
        self._init_samples()
        for name, _ in self.fold_list:
            self._sample(name)

    def _paths(self, name: str) -> tuple[str, str]:
        return (os.path.join(self.root, "JPEGImages", name + ".jpg"),
                os.path.join(self.root, "SegmentationClassAug", name + ".png"))

    def hsnet_episodes(self, shots: int, seed: int = 0, count: int = HSNET_EPISODES) -> list[Episode]:
        """HSNet's episodes (``count`` < 1000: the first of them, a quick check that is not the protocol)."""
        return self._episodes(hsnet_pascal_stream(self.fold_list, shots, episodes=count, seed=seed))


class CocoBenchmark(_ClassIdBenchmark):
    """COCO-20i fold ``fold`` (classes ``fold + 1, fold + 5, ..., fold + 77``) as HSNet evaluates it."""

    name = "coco20i"
    num_labels = 80
    ignore_index = None  # HSNet's COCO masks have no ignored pixels

    def __init__(self, root: str | os.PathLike, splits: HsnetSplits, fold: int):
        self.root = _inside(root, "COCO2014", "annotations")
        self.fold, self.splits = fold, splits
        self.classes = fold_classes("coco20i", fold)
        self.pools = splits.coco_fold(fold)
        self._init_samples()

    def _paths(self, name: str) -> tuple[str, str]:
        stem = name[:name.index(".jpg")] if ".jpg" in name else os.path.splitext(name)[0]
        mask = os.path.join(self.root, "annotations", *(stem + ".png").split("/"))
        return os.path.join(self.root, *name.split("/")), mask

    def hsnet_episodes(self, shots: int, seed: int = 0, count: int = HSNET_EPISODES) -> list[Episode]:
        """HSNet's episodes (``count`` < 1000: the first of them, a quick check that is not the protocol)."""
        return self._episodes(hsnet_coco_stream(self.pools, self.classes, shots, episodes=count, seed=seed))


# ------------------------------------------------------------------------------------ bad samples
@dataclasses.dataclass
class Screened:
    """The episodes a run keeps, and what was wrong with the data (each bad file once)."""

    episodes: list[Episode]
    problems: list[Problem]
    skipped: int  # episodes dropped because one of their files was bad
    policy: str

    def summary(self) -> list[str]:
        """One line per bad file: what is wrong and what the run did about it."""
        lines = []
        for p in self.problems:
            action = p.repair if (p.repair and self.policy == "resize") else "its episodes skipped"
            lines.append(f"{p.path}: {p.text} ({action})")
        return lines

    def to_json(self) -> dict:
        return {"policy": self.policy, "skipped_episodes": self.skipped,
                "bad_samples": [{"file": p.path, "problem": p.text,
                                 "action": p.repair if (p.repair and self.policy == "resize") else "episodes skipped"}
                                for p in self.problems]}


def screen_episodes(dataset: Dataset, episodes: Sequence[Episode], policy: str = "resize",
                    workers: int = 4) -> Screened:
    """Inspect every file the episodes use (masks decoded, images' headers read) and apply ``policy``.

    ``fail`` raises a :class:`DataError` listing every bad file; ``skip`` drops each episode that uses
    one; ``resize`` drops only episodes with an unusable file (missing, unreadable) and keeps the rest,
    which :meth:`Dataset.load` with ``fit_mask=True`` then repairs.
    """
    if policy not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"policy must be one of {BAD_SAMPLE_POLICIES}, got {policy!r}")
    used = sorted({i for e in episodes for i in (e.query, *e.supports)})
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # Pillow decodes without the GIL
        found = dict(zip(used, pool.map(lambda i: dataset.inspect(dataset[i]), used)))
    problems, seen = [], set()
    for index in used:
        for problem in found[index]:
            if (problem.path, problem.text) not in seen:
                seen.add((problem.path, problem.text))
                problems.append(problem)
    if policy == "fail" and problems:
        raise DataError(_listing(f"{dataset.root}: {len(problems)} bad samples (--on-bad-sample resize uses them as "
                                 f"HSNet does, skip leaves their episodes out)", [str(p) for p in problems], limit=20))
    bad = {i for i, found_here in found.items()
           if any(p.repair is None or policy == "skip" for p in found_here)}
    kept = [e for e in episodes if not bad.intersection((e.query, *e.supports))]
    return Screened(kept, problems, len(episodes) - len(kept), policy)


def describe_episode(dataset: Dataset, episode: Episode) -> dict:
    """An episode by names, as ``evaluate --list-episodes`` prints it."""
    label = episode.group if dataset.num_labels is None else episode.label
    return {"episode": episode.index, "class": label, "query": dataset[episode.query].name,
            "supports": [dataset[s].name for s in episode.supports]}


__all__ = ["BAD_SAMPLE_POLICIES", "CocoBenchmark", "FSS1000Benchmark", "HSNET_EPISODES", "PascalBenchmark",
           "Screened", "describe_episode", "hsnet_jpgs", "screen_episodes"]
