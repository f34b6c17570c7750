"""Few-shot episodes: which images prompt which query, for evaluation protocols and few-shot runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .datasets import DataError, Dataset


@dataclasses.dataclass(frozen=True)
class Episode:
    """Few-shot episode: ``supports`` (indices) give the prompts for ``query``; ``label`` is the class
    segmented (class id for class-id datasets; 1 for binary datasets)."""

    query: int
    supports: tuple[int, ...]
    label: int
    group: str


def sample_episodes(dataset: Dataset, *, shots: int = 1, queries_per_group: int | None = None,
                    seed: int = 0) -> list[Episode]:
    """One-/few-shot episodes within each group (FSS-1000 class): every image (or ``queries_per_group``
    of them) is a query once, with ``shots`` other images of its group as supports."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    episodes = []
    for group, members in sorted(dataset.groups().items()):
        if len(members) <= shots:
            raise DataError(f"group {group or dataset.root!r} has {len(members)} images; {shots}-shot episodes need "
                            f"at least {shots + 1}")
        queries = members if queries_per_group is None else list(rng.permutation(members)[:queries_per_group])
        for query in queries:
            others = [m for m in members if m != query]
            supports = tuple(int(s) for s in rng.permutation(others)[:shots])
            episodes.append(Episode(int(query), supports, 1, group))
    return episodes


def class_episodes(dataset: Dataset, classes: Sequence[int], *, shots: int = 1, seed: int = 0,
                   max_episodes: int | None = None) -> list[Episode]:
    """Episodes for class-id datasets (COCO-20i / PASCAL-5i style): for every image and every listed
    class present in it, ``shots`` other images containing that class are the supports."""
    rng = np.random.default_rng(seed)
    present: dict[int, list[int]] = {c: [] for c in classes}
    for index, sample in enumerate(dataset.samples):
        _, labels = dataset.load(sample)
        for c in np.unique(labels):
            if int(c) in present:
                present[int(c)].append(index)
    episodes = []
    for c in classes:
        holders = present[c]
        if len(holders) <= shots:
            continue
        for query in holders:
            others = [h for h in holders if h != query]
            episodes.append(Episode(query, tuple(int(s) for s in rng.permutation(others)[:shots]), int(c), str(c)))
    order = rng.permutation(len(episodes))
    episodes = [episodes[i] for i in order]
    return episodes[:max_episodes] if max_episodes else episodes


#: Few-shot fold splits: PASCAL-5i holds classes 5i+1..5i+5 of 20 in fold i; COCO-20i (the interleaved
#: split used by HSNet and later work) holds classes i+1, i+5, i+9, ... of 80.
def fold_classes(protocol: str, fold: int) -> list[int]:
    if protocol == "pascal5i":
        if not 0 <= fold < 4:
            raise ValueError(f"PASCAL-5i has folds 0..3, got {fold}")
        return list(range(5 * fold + 1, 5 * fold + 6))
    if protocol == "coco20i":
        if not 0 <= fold < 4:
            raise ValueError(f"COCO-20i has folds 0..3, got {fold}")
        return [fold + 1 + 4 * k for k in range(20)]
    raise ValueError(f"unknown protocol {protocol!r}")
