"""Few-shot episodes: which images prompt which query, for evaluation protocols and few-shot runs.

Two samplers:

* **HSNet's** (:func:`hsnet_fss_stream`, :func:`hsnet_pascal_stream`, :func:`hsnet_coco_stream`): the
  episodes of the standard few-shot protocol as HSNet (``juhongm999/hsnet``, the evaluation code of
  HSNet, VAT, Matcher and most later papers) draws them at test time: numpy's legacy global
  ``RandomState`` seeded with 0 at the start of each run (one benchmark, fold and shot count), each
  draw ``choice(pool, 1, replace=False)`` (which consumes a whole permutation of the pool), in the
  order its data loader asks for them. Supports are redrawn while equal to the query and may repeat
  across shots.

  - FSS-1000: the classes sorted; in each, the ``.jpg`` files sorted by name (so queries run
    ``1, 10, 2, ..., 9``); each support drawn from ``1..10``.
  - PASCAL-5i: the fold's list cycled to 1000 episodes in file order; supports from the class's
    entries of the list.
  - COCO-20i: 1000 episodes; a class drawn from the fold's 20, then the query from its pool, then
    the supports from the same pool.

* **All pairs** (:func:`sample_episodes`, :func:`class_episodes`): every image (and, for class-id
  datasets, every class it holds) is a query once, with random supports; ``max_episodes`` takes a
  seeded random subset, never a prefix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ..config import check_count
from ..imaging.decode import InputError
from .datasets import DataError, Dataset, Problem


@dataclasses.dataclass(frozen=True)
class Episode:
    """Few-shot episode: ``supports`` (indices) give the prompts for ``query``; ``label`` is the class
    segmented (class id for class-id datasets; 1 for binary datasets). ``index``: the episode's position
    in the sampler's full stream (kept when a subset is taken or bad samples are skipped)."""

    query: int
    supports: tuple[int, ...]
    label: int
    group: str
    index: int = -1


# ------------------------------------------------------------------------------------ HSNet's sampler
def _hsnet_draw(rng: np.random.RandomState, size: int) -> int:
    """One ``rng.choice(pool, 1, replace=False)`` on a pool of ``size`` items: its index (the legacy
    generator takes ``permutation(size)[0]``, so every draw consumes a full shuffle, as in HSNet)."""
    return int(rng.choice(size, 1, replace=False)[0])


def _hsnet_supports(rng: np.random.RandomState, pool: Sequence[str], query: str, shots: int, what: str) -> list[str]:
    if all(name == query for name in pool):
        raise DataError(f"{what}: no support other than the query {query} (HSNet's sampler would never stop)")
    supports: list[str] = []
    while len(supports) < shots:  # redrawn while equal to the query; repeats across shots allowed
        name = pool[_hsnet_draw(rng, len(pool))]
        if name != query:
            supports.append(name)
    return supports


def hsnet_fss_stream(files: Mapping[str, Sequence[str]], shots: int, seed: int = 0) -> list[tuple[str, str, list[str]]]:
    """HSNet's FSS-1000 episodes: ``[(class, query file, support files)]``.

    ``files``: each class's ``.jpg`` file names (HSNet takes the names whose part after the first dot
    is ``jpg``); classes and files are sorted here, and each support is ``N.jpg`` for ``N`` drawn from
    ``1..10`` (whether or not that file exists: HSNet assumes the dataset's ten per class)."""
    _check_shots(shots)
    rng = np.random.RandomState(seed)
    candidates = [f"{n}.jpg" for n in range(1, 11)]
    out = []
    for name in sorted(files):
        for query in sorted(files[name]):
            out.append((name, query, _hsnet_supports(rng, candidates, query, shots, f"FSS-1000 class {name}")))
    return out


def hsnet_pascal_stream(fold_list: Sequence[tuple[str, int]], shots: int, *, episodes: int = 1000,
                        seed: int = 0) -> list[tuple[int, str, list[str]]]:
    """HSNet's PASCAL-5i episodes: ``[(class id, query name, support names)]``, the fold's
    ``(name, class)`` list cycled to ``episodes`` in file order, supports from the class's entries."""
    _check_shots(shots)
    if not fold_list:
        raise DataError("the PASCAL-5i fold list is empty")
    pools: dict[int, list[str]] = {}
    for name, label in fold_list:
        pools.setdefault(label, []).append(name)
    rng = np.random.RandomState(seed)
    out = []
    for index in range(episodes):
        query, label = fold_list[index % len(fold_list)]
        out.append((label, query, _hsnet_supports(rng, pools[label], query, shots, f"PASCAL-5i class {label}")))
    return out


def hsnet_coco_stream(pools: Mapping[int, Sequence[str]], classes: Sequence[int], shots: int, *,
                      episodes: int = 1000, seed: int = 0) -> list[tuple[int, str, list[str]]]:
    """HSNet's COCO-20i episodes: ``[(class id, query name, support names)]``; per episode a class
    drawn uniformly from ``classes`` (in their order), then the query from its pool, then the supports."""
    _check_shots(shots)
    empty = [c for c in classes if not pools.get(c)]
    if empty:
        raise DataError(f"COCO-20i classes without images in the fold list: {empty}")
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(episodes):
        label = classes[_hsnet_draw(rng, len(classes))]
        pool = pools[label]
        query = pool[_hsnet_draw(rng, len(pool))]
        out.append((label, query, _hsnet_supports(rng, pool, query, shots, f"COCO-20i class {label}")))
    return out


def _check_shots(shots: int) -> None:
    check_count("shots", shots)


# ------------------------------------------------------------------------------------ all pairs
def random_subset(episodes: list[Episode], count: int | None, seed: int) -> list[Episode]:
    """``count`` episodes drawn at random (seeded), in their original order; all of them without ``count``."""
    if count is None or count >= len(episodes):
        return episodes
    keep = np.sort(np.random.default_rng(seed).choice(len(episodes), count, replace=False))
    return [episodes[i] for i in keep]


def sample_episodes(dataset: Dataset, *, shots: int = 1, queries_per_group: int | None = None,
                    seed: int = 0, max_episodes: int | None = None) -> list[Episode]:
    """One-/few-shot episodes within each group (FSS-1000 class): every image (or ``queries_per_group``
    of them) is a query once, with ``shots`` other images of its group as supports. ``max_episodes``:
    a seeded random subset of them."""
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
            episodes.append(Episode(int(query), supports, 1, group, len(episodes)))
    return random_subset(episodes, max_episodes, seed)


def class_episodes(dataset: Dataset, classes: Sequence[int], *, shots: int = 1, seed: int = 0,
                   max_episodes: int | None = None, unreadable: list | None = None) -> list[Episode]:
    """Episodes for class-id datasets (COCO-20i / PASCAL-5i style): for every image and every listed
    class present in it, ``shots`` other images containing that class are the supports. Only the masks
    are read. ``max_episodes``: a seeded random subset of them. ``unreadable``: a list that collects a
    :class:`~seggpt_jax.data.datasets.Problem` for each mask that cannot be read (those images are left
    out); without it such a mask raises."""
    rng = np.random.default_rng(seed)
    present: dict[int, list[int]] = {c: [] for c in classes}
    for index, sample in enumerate(dataset.samples):
        try:
            labels = dataset.load_mask(sample)
        except InputError as e:
            if unreadable is None:
                raise
            unreadable.append(Problem(sample.mask, " ".join(str(e).split()), None))
            continue
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
            episodes.append(Episode(query, tuple(int(s) for s in rng.permutation(others)[:shots]), int(c), str(c),
                                    len(episodes)))
    order = rng.permutation(len(episodes))
    episodes = [episodes[i] for i in order]
    return episodes[:max_episodes] if max_episodes else episodes  # a prefix of a random order: a random subset


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
