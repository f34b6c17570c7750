"""Datasets of (image, mask) pairs, with every mask read by the one mask rule.

Layouts:

* :class:`FolderDataset`: ``ROOT/images/NAME.jpg`` with ``ROOT/masks/NAME.png``: binary masks by
  default, class-id masks (or palette colours, or any colours through ``colour_map``) with
  ``num_labels``, or masks used as RGB pictures with ``rgb_masks=True``; an ``ignore_index`` (255 by
  default for class ids) marks pixels the loss and metrics skip.
* :class:`FSS1000Dataset`: ``ROOT/CLASS/N.jpg`` with ``ROOT/CLASS/N.png`` (binary masks), one folder
  per class, as FSS-1000 ships.

How a mask is read is :mod:`seggpt_jax.imaging.masks`' decision: a binary mask's foreground is every
pixel at least half as bright as its brightest (anti-aliased, 0/1, 16-bit and coloured masks all
work); class ids come from one channel, palette indices, grey RGB or palette colours.
:meth:`Dataset.validate` decodes every file and reports *all* problems (unpaired files, unreadable or
truncated files, size mismatches, class ids out of range, unknown colours) in one
:class:`DataError` before any training starts.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from ..imaging.decode import IMAGE_EXTENSIONS, InputError, open_image, to_rgb_uint8
from ..imaging.masks import ColourMap, LabelError, binary_picture, class_ids, foreground, labels_to_rgb
from ..imaging.processor import SegGptImageProcessor, torch_nearest_index


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


class Dataset:
    """(image, mask) samples and how to read them; subclasses find the samples."""

    samples: list[Sample]
    num_labels: int | None = None
    ignore_index: int | None = None
    rgb_masks: bool = False
    colour_map: ColourMap | None = None
    root: str

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def load(self, sample: Sample, *, fit_mask: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(image [H, W, 3] uint8, labels [H, W] int64)``: class ids, or 0/1 for binary masks, with
        ``ignore_index`` where pixels are skipped; RGB masks (``rgb_masks``) come back as ``[H, W, 3]`` uint8.

        ``fit_mask``: a mask whose size differs from its image is resized to it (nearest), as a
        benchmark run's ``--on-bad-sample resize`` does; otherwise the caller sees both sizes."""
        image = to_rgb_uint8(open_image(sample.image))
        labels = self.load_mask(sample)
        if fit_mask and labels.shape[:2] != image.shape[:2]:
            labels = resize_labels(labels, image.shape[:2])
        return image, labels

    def load_mask(self, sample: Sample) -> np.ndarray:
        """The mask alone (no image decoded), as :meth:`load` returns it."""
        return self.read_mask(sample)[0]

    def read_mask(self, sample: Sample) -> tuple[np.ndarray, list["Problem"]]:
        """The mask, and the defects of a readable mask that a benchmark repairs the way its reference
        code reads it (none for a plain dataset, whose mask rule reads every mask)."""
        mask = open_image(sample.mask)
        what = f"mask {sample.mask}"
        if self.rgb_masks:
            return binary_picture(mask, what=what), []
        if self.num_labels is not None:
            return class_ids(mask, self.num_labels, colour_map=self.colour_map, ignore_index=self.ignore_index,
                             what=what), []
        if self.ignore_index is None:
            return foreground(mask, what=what).astype(np.int64), []
        levels = binary_picture(mask, what=what).max(axis=-1)  # for binary masks the ignore value is a grey level
        ignored = levels == self.ignore_index
        labels = foreground(np.where(ignored, 0, levels), what=what).astype(np.int64)
        return np.where(ignored, self.ignore_index, labels), []

    def mask_picture(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A loaded mask as the RGB picture the model paints (binary: white foreground; class ids: the
        SegGPT palette; RGB masks as they are) and its ``valid`` map (False on the ignore index)."""
        if labels.ndim == 3:  # RGB masks
            return labels, np.ones(labels.shape[:2], bool)
        valid = labels != self.ignore_index if self.ignore_index is not None else np.ones(labels.shape, bool)
        return labels_to_rgb(np.where(valid, labels, 0), self.num_labels or 1, what="training mask"), valid

    def inspect(self, sample: Sample) -> list["Problem"]:
        """Everything wrong with one sample, reading the mask and the image's header only: missing or
        unreadable files (unusable), a mask of another size than its image (``resize`` fits it), and the
        repairable defects :meth:`read_mask` finds."""
        problems = [Problem(path, "missing", None) for path in (sample.image, sample.mask) if not os.path.exists(path)]
        if problems:
            return problems
        size = None
        try:
            size = image_size(sample.image)
        except InputError as e:
            problems.append(Problem(sample.image, _reason(e, sample.image), None))
        try:
            labels, notes = self.read_mask(sample)
        except InputError as e:
            return problems + [Problem(sample.mask, _reason(e, sample.mask), None)]
        problems += notes
        if size is not None and labels.shape[:2] != size:
            problems.append(Problem(sample.mask, f"is {labels.shape[1]}x{labels.shape[0]} but its image is "
                                                 f"{size[1]}x{size[0]}", "resized to its image (nearest)"))
        return problems

    def validate(self, workers: int = 4) -> "Dataset":
        """Decode every image and mask (truncated files fail here, not mid-training) and check them all."""
        if not self.samples:
            raise DataError(f"{self.root}: the dataset is empty")
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # Pillow decodes without the GIL
            problems = [p for p in pool.map(self._problem, self.samples) if p is not None]
        if problems:
            kinds: dict[str, list[str]] = {}
            for kind, text in problems:
                kinds.setdefault(kind, []).append(text)
            raise DataError(f"{self.root}: " + "; ".join(_listing(kind, items) for kind, items in kinds.items()))
        return self

    def _problem(self, sample: Sample) -> tuple[str, str] | None:
        try:
            image, labels = self.load(sample)
        except LabelError as e:
            return (f"class ids above num_labels={self.num_labels} (ignore_index={self.ignore_index})",
                    f"{sample.mask} has class ids {e.found}")
        except InputError as e:
            return "unreadable files or masks", str(e)
        if image.shape[:2] != labels.shape[:2]:
            return ("masks whose size differs from their image",
                    f"{sample.mask} is {labels.shape[1]}x{labels.shape[0]} but {sample.image} is "
                    f"{image.shape[1]}x{image.shape[0]}")
        return None

    def groups(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, sample in enumerate(self.samples):
            out.setdefault(sample.group, []).append(i)
        return out


@dataclasses.dataclass(frozen=True)
class Problem:
    """One defect of one file: ``repair`` says what ``--on-bad-sample resize`` does about it, ``None``
    when the file cannot be used at all (its episodes are skipped under every policy)."""

    path: str
    text: str
    repair: str | None

    def __str__(self) -> str:
        return f"{self.path}: {self.text}" + (f" ({self.repair})" if self.repair else "")


def _reason(error: Exception, path: str) -> str:
    """An error message without the path it starts with (the problem names the path itself)."""
    text = " ".join(str(error).split())
    for prefix in (f"cannot read image {path}: ", f"mask {path} ", f"{path} "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text.replace(path, "the file")


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header, EXIF orientation applied (as decoding does)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees when decoded
                width, height = height, width
    except FileNotFoundError:
        raise InputError(f"no such image file: {path}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None
    return height, width


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Labels ``[H, W]`` (or ``[H, W, C]``) resized to ``size`` with torch's ``nearest`` rule."""
    rows, cols = torch_nearest_index(labels.shape[0], size[0]), torch_nearest_index(labels.shape[1], size[1])
    return labels[rows][:, cols]


def _images_in(folder: str) -> dict[str, str]:
    return {os.path.splitext(name)[0]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")}


class FolderDataset(Dataset):
    """``ROOT/images/NAME.*`` paired with ``ROOT/masks/NAME.*`` by file name."""

    def __init__(self, root: str | os.PathLike, *, num_labels: int | None = None, ignore_index: int | None | str = "auto",
                 images: str = "images", masks: str = "masks", rgb_masks: bool = False,
                 colour_map: ColourMap | Mapping | str | None = None):
        """``num_labels=None``: binary masks. ``ignore_index="auto"``: 255 for class-id masks (VOC's
        "void"), none for binary masks (where 255 is foreground). ``colour_map``: colour -> class id
        for RGB masks in another palette (needs ``num_labels``)."""
        self.root = os.fspath(root)
        if ignore_index == "auto":
            ignore_index = 255 if num_labels is not None else None
        if colour_map is not None and num_labels is None:
            raise DataError(f"{self.root}: a colour map gives class ids; pass num_labels too")
        self.num_labels, self.ignore_index, self.rgb_masks = num_labels, ignore_index, rgb_masks
        self.colour_map = ColourMap.parse(colour_map) if colour_map is not None else None
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


class FSS1000Dataset(Dataset):
    """FSS-1000: one folder per class holding ``N.jpg`` images and ``N.png`` binary masks."""

    def __init__(self, root: str | os.PathLike, *, classes: Sequence[str] | None = None):
        self.root = os.fspath(root)
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
