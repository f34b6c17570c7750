"""Datasets of (image, mask) pairs, seeded episodes, paired augmentations, and a prefetching loader.

Layouts:

* :class:`FolderDataset`: ``ROOT/images/NAME.jpg`` with ``ROOT/masks/NAME.png`` (class-id masks, or RGB
  masks with ``rgb_masks=True``); an ``ignore_index`` (255 by default) marks pixels the loss skips.
* :class:`FSS1000Dataset`: ``ROOT/CLASS/N.jpg`` with ``ROOT/CLASS/N.png`` (binary masks), one folder
  per class, as FSS-1000 ships.

:meth:`validate` reads every mask and reports *all* problems (unpaired files, size mismatches, class
ids out of range, empty dataset) in one :class:`DataError` before any training starts.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from ..imaging.media import IMAGE_EXTENSIONS
from ..imaging.processor import SegGptImageProcessor, mask_to_rgb, open_image


class DataError(ValueError):
    """A dataset problem, named by file."""


@dataclasses.dataclass(frozen=True)
class Sample:
    image: str
    mask: str
    group: str  # FSS-1000 class folder, or "" for a flat folder
    name: str


def _listing(title: str, items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")
    return f"{title}: {shown}"


class _Dataset:
    samples: list[Sample]
    num_labels: int | None
    ignore_index: int | None
    root: str

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """``(image [H, W, 3] uint8, labels [H, W] int64)``; RGB masks come back as ``[H, W, 3]`` uint8."""
        image = np.asarray(open_image(sample.image).convert("RGB"))
        mask = open_image(sample.mask)
        if getattr(self, "rgb_masks", False):
            return image, np.asarray(mask.convert("RGB"))
        labels = np.asarray(mask.convert("L") if mask.mode in ("RGB", "RGBA", "LA") else mask).astype(np.int64)
        if self.num_labels is None:  # binary masks: anything non-zero (but the ignore index) is foreground
            ignored = labels == self.ignore_index if self.ignore_index is not None else np.zeros(labels.shape, bool)
            labels = np.where(ignored, self.ignore_index or 0, (labels != 0).astype(np.int64))
        return image, labels

    def painted(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A loaded mask as the RGB picture the model paints (binary: white foreground; class ids: the
        SegGPT palette; RGB masks as they are) and its ``valid`` map (False on the ignore index)."""
        if labels.ndim == 3:  # RGB masks
            return labels, np.ones(labels.shape[:2], bool)
        valid = labels != self.ignore_index if self.ignore_index is not None else np.ones(labels.shape, bool)
        return mask_to_rgb(np.where(valid, labels, 0), self.num_labels or 1, what="training mask"), valid

    def validate(self) -> "_Dataset":
        problems: list[str] = []
        if not self.samples:
            raise DataError(f"{self.root}: the dataset is empty")
        bad_size, bad_labels, unreadable = [], [], []
        for sample in self.samples:
            try:
                with Image.open(sample.image) as image:
                    image_size = image.size
                with Image.open(sample.mask) as mask:
                    mask_size = mask.size
            except Exception as e:  # noqa: BLE001
                unreadable.append(f"{sample.name} ({e})")
                continue
            if image_size != mask_size:
                bad_size.append(f"{sample.mask} is {mask_size[0]}x{mask_size[1]} but {sample.image} is "
                                f"{image_size[0]}x{image_size[1]}")
                continue
            if self.num_labels is not None and not getattr(self, "rgb_masks", False):
                _, labels = self.load(sample)
                valid = labels[labels != self.ignore_index] if self.ignore_index is not None else labels
                if valid.size and (valid.max() > self.num_labels or valid.min() < 0):
                    found = sorted(int(v) for v in np.unique(valid[(valid > self.num_labels) | (valid < 0)])[:5])
                    bad_labels.append(f"{sample.mask} has class ids {found}")
        if unreadable:
            problems.append(_listing("unreadable files", unreadable))
        if bad_size:
            problems.append(_listing("masks whose size differs from their image", bad_size))
        if bad_labels:
            problems.append(_listing(f"class ids above num_labels={self.num_labels} (ignore_index={self.ignore_index})",
                                     bad_labels))
        if problems:
            raise DataError(f"{self.root}: " + "; ".join(problems))
        return self

    def groups(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, sample in enumerate(self.samples):
            out.setdefault(sample.group, []).append(i)
        return out


def _images_in(folder: str) -> dict[str, str]:
    return {os.path.splitext(name)[0]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")}


class FolderDataset(_Dataset):
    """``ROOT/images/NAME.*`` paired with ``ROOT/masks/NAME.*`` by file name."""

    def __init__(self, root: str | os.PathLike, *, num_labels: int | None = None, ignore_index: int | None | str = "auto",
                 images: str = "images", masks: str = "masks", rgb_masks: bool = False):
        """``num_labels=None``: binary masks (non-zero = foreground). ``ignore_index="auto"``: 255 for
        class-id masks (VOC's "void"), none for binary masks (where 255 is foreground)."""
        self.root = os.fspath(root)
        if ignore_index == "auto":
            ignore_index = 255 if num_labels is not None else None
        self.num_labels, self.ignore_index, self.rgb_masks = num_labels, ignore_index, rgb_masks
        image_dir, mask_dir = os.path.join(self.root, images), os.path.join(self.root, masks)
        for folder in (image_dir, mask_dir):
            if not os.path.isdir(folder):
                raise DataError(f"{self.root}: expected a folder {folder} (layout ROOT/{images}/NAME.jpg + "
                                f"ROOT/{masks}/NAME.png)")
        image_files, mask_files = _images_in(image_dir), _images_in(mask_dir)
        lonely_masks = sorted(set(mask_files) - set(image_files))
        lonely_images = sorted(set(image_files) - set(mask_files))
        problems = []
        if lonely_masks:
            problems.append(_listing(f"masks without an image in {image_dir}", [mask_files[k] for k in lonely_masks]))
        if lonely_images:
            problems.append(_listing(f"images without a mask in {mask_dir}", [image_files[k] for k in lonely_images]))
        if problems:
            raise DataError(f"{self.root}: " + "; ".join(problems))
        self.samples = [Sample(image_files[k], mask_files[k], "", k) for k in sorted(image_files)]


class FSS1000Dataset(_Dataset):
    """FSS-1000: one folder per class holding ``N.jpg`` images and ``N.png`` binary masks."""

    def __init__(self, root: str | os.PathLike, *, classes: Sequence[str] | None = None):
        self.root = os.fspath(root)
        self.num_labels, self.ignore_index, self.rgb_masks = None, None, False
        if not os.path.isdir(self.root):
            raise DataError(f"no such dataset folder: {self.root}")
        names = sorted(d for d in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, d)))
        if classes is not None:
            missing = sorted(set(classes) - set(names))
            if missing:
                raise DataError(_listing(f"{self.root}: classes not found", missing))
            names = [n for n in names if n in set(classes)]
        self.samples, problems = [], []
        for name in names:
            folder = os.path.join(self.root, name)
            files = sorted(os.listdir(folder))
            images = {os.path.splitext(f)[0]: os.path.join(folder, f) for f in files if f.lower().endswith((".jpg", ".jpeg"))}
            masks = {os.path.splitext(f)[0]: os.path.join(folder, f) for f in files if f.lower().endswith(".png")}
            for stem in sorted(set(masks) - set(images)):
                problems.append(masks[stem])
            for stem in sorted(set(images) - set(masks)):
                problems.append(images[stem])
            self.samples += [Sample(images[s], masks[s], name, f"{name}/{s}") for s in sorted(set(images) & set(masks))]
        if problems:
            raise DataError(_listing(f"{self.root}: files without their image/mask partner", problems))


def resize_valid(processor: SegGptImageProcessor, valids: Sequence[np.ndarray]) -> np.ndarray:
    """``[n, 1, h, w]`` bool: full-resolution valid maps resized (nearest) to the model's input size."""
    pictures = [np.repeat(v[..., None].astype(np.uint8) * 255, 3, -1) for v in valids]
    resized = processor(prompt_masks=pictures, do_convert_rgb=False, do_normalize=False, return_tensors="np")
    return resized["prompt_masks"][:, :1] > 0.5


# ------------------------------------------------------------------------------------ episodes
@dataclasses.dataclass(frozen=True)
class Episode:
    """Few-shot episode: ``supports`` (indices) give the prompts for ``query``; ``label`` is the class
    segmented (class id for class-id datasets; 1 for binary datasets)."""

    query: int
    supports: tuple[int, ...]
    label: int
    group: str


def sample_episodes(dataset: _Dataset, *, shots: int = 1, queries_per_group: int | None = None,
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


def class_episodes(dataset: _Dataset, classes: Sequence[int], *, shots: int = 1, seed: int = 0,
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


# ------------------------------------------------------------------------------------ augmentation
@dataclasses.dataclass(frozen=True)
class Augment:
    """Random resized crop and horizontal flip applied alike to image and mask; colour jitter on the image."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter: float = 0.2

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        height, width = image.shape[:2]
        area = height * width
        top, left, h, w = 0, 0, height, width
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
            w_try, h_try = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
            if 0 < w_try <= width and 0 < h_try <= height:
                top, left = rng.integers(0, height - h_try + 1), rng.integers(0, width - w_try + 1)
                h, w = h_try, w_try
                break
        image, mask = image[top:top + h, left:left + w], mask[top:top + h, left:left + w]
        if rng.random() < self.hflip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if self.jitter:
            picture = Image.fromarray(np.ascontiguousarray(image))
            for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                picture = enhancer(picture).enhance(1 + rng.uniform(-self.jitter, self.jitter))
            image = np.asarray(picture)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)


# ------------------------------------------------------------------------------------ loading
class Prefetcher:
    """``make(step)`` for ``step`` in ``range(start, stop)``, computed ``depth`` steps ahead on threads
    (Pillow decoding and resizing release the GIL), yielded in order."""

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2, workers: int = 2):
        self.make, self.start, self.stop, self.depth, self.workers = make, start, stop, depth, workers

    def __iter__(self) -> Iterator[Any]:
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            pending = {}
            for step in range(self.start, min(self.stop, self.start + self.depth)):
                pending[step] = pool.submit(self.make, step)
            for step in range(self.start, self.stop):
                result = pending.pop(step).result()
                ahead = step + self.depth
                if ahead < self.stop:
                    pending[ahead] = pool.submit(self.make, ahead)
                yield result


# ------------------------------------------------------------------------------------ synthetic task
SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 230), "yellow": (235, 215, 40)}


def synthetic_pair(rng: np.random.Generator, size: tuple[int, int] = (64, 64), target: str = "red",
                   shapes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with coloured rectangles and discs; the mask marks every shape of ``target``
    colour. At least one target shape is always present."""
    height, width = size
    noise = rng.integers(60, 140, (height // 4 + 1, width // 4 + 1, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(noise).resize((width, height), Image.BILINEAR)).copy()
    mask = np.zeros((height, width), np.int64)
    names = list(SHAPE_COLOURS)
    ys, xs = np.mgrid[:height, :width]
    for k in range(shapes):
        colour = target if k == 0 else names[rng.integers(len(names))]
        h, w = rng.integers(height // 6, height // 3), rng.integers(width // 6, width // 3)
        top, left = rng.integers(0, height - h), rng.integers(0, width - w)
        if rng.random() < 0.5:
            region = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
        else:
            region = ((ys - top - h / 2) / (h / 2)) ** 2 + ((xs - left - w / 2) / (w / 2)) ** 2 <= 1
        image[region] = SHAPE_COLOURS[colour]
        mask[region] = 1 if colour == target else 0
    return image, mask


def write_synthetic_folder(root: str | os.PathLike, count: int, *, target: str = "red", seed: int = 0,
                           size: tuple[int, int] = (64, 64)) -> str:
    """A :class:`FolderDataset` of :func:`synthetic_pair` samples (binary masks 0/255)."""
    root = os.fspath(root)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image, mask = synthetic_pair(rng, size, target)
        Image.fromarray(image).save(os.path.join(root, "images", f"{i:04d}.png"))
        Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(os.path.join(root, "masks", f"{i:04d}.png"))
    return root


def write_synthetic_fss(root: str | os.PathLike, per_class: int, *, colours: Sequence[str] = tuple(SHAPE_COLOURS),
                        seed: int = 0, size: tuple[int, int] = (64, 64)) -> str:
    """An :class:`FSS1000Dataset` layout where class ``c`` means "segment every shape of colour c": the
    same kind of picture has different masks per class, so only the prompt tells the task."""
    root = os.fspath(root)
    rng = np.random.default_rng(seed)
    for colour in colours:
        folder = os.path.join(root, colour)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            image, mask = synthetic_pair(rng, size, colour)
            Image.fromarray(image).save(os.path.join(folder, f"{i + 1}.jpg"), quality=95)
            Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(os.path.join(folder, f"{i + 1}.png"))
    return root
