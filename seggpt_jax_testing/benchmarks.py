"""Generated miniatures of the standard benchmarks' layouts (HSNet's FSS-1000, PASCAL VOC2012 +
SegmentationClassAug, COCO2014 per-image masks, DAVIS-2017) and of HSNet's split lists, for tests.

The split lists are generated, not HSNet's: their sha256 differ from the real files, so a test that
runs them through the protocols passes their checksums (``HsnetSplits(checksums=...)``, or by patching
``seggpt_jax.data.splits.HSNET_SHA256``).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Sequence

import numpy as np
from PIL import Image


def _bytes(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


def write_fss_tree(root: str | os.PathLike, classes: Sequence[str], *, images: int = 10,
                   size: tuple[int, int] = (4, 4)) -> str:
    """``root/FSS-1000/<class>/<n>.jpg|png`` for n = 1..images: the same small picture and mask everywhere
    (enough to draw episodes and read masks; quick to write for 240 classes)."""
    base = os.path.join(os.fspath(root), "FSS-1000")
    mask = np.zeros(size, np.uint8)
    mask[: size[0] // 2] = 255
    jpg = _bytes(np.full((*size, 3), 90, np.uint8), "JPEG")
    png = _bytes(mask, "PNG", "L")
    for name in classes:
        folder = os.path.join(base, name)
        os.makedirs(folder, exist_ok=True)
        for n in range(1, images + 1):
            with open(os.path.join(folder, f"{n}.jpg"), "wb") as f:
                f.write(jpg)
            with open(os.path.join(folder, f"{n}.png"), "wb") as f:
                f.write(png)
    return os.fspath(root)


def _scene(rng: np.random.Generator, size: tuple[int, int], label: int, ring: bool) -> tuple[np.ndarray, np.ndarray]:
    """A textured picture with one coloured rectangle, and its class-id mask (255 ring around it)."""
    height, width = size
    image = rng.integers(40, 120, (height, width, 3)).astype(np.uint8)
    top, left = rng.integers(1, height // 3), rng.integers(1, width // 3)
    bottom, right = top + height // 2, left + width // 2
    image[top:bottom, left:right] = (200, 60 + 2 * label, 40)
    mask = np.zeros(size, np.uint8)
    if ring:
        mask[top - 1:bottom + 1, left - 1:right + 1] = 255
    mask[top:bottom, left:right] = label
    return image, mask


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _checksums(splits: str, relatives: Sequence[str]) -> dict[str, str]:
    out = {}
    for relative in relatives:
        with open(os.path.join(splits, *relative.split("/")), "rb") as f:
            out[relative] = hashlib.sha256(f.read()).hexdigest()
    return out


def write_pascal_miniature(root: str | os.PathLike, splits: str | os.PathLike, *, per_class: int = 3,
                           size: tuple[int, int] = (24, 24), seed: int = 0) -> dict[str, str]:
    """``root/VOC2012/{JPEGImages,SegmentationClassAug}`` with ``per_class`` images of each of the 20
    classes (L-mode masks: the class id, a 255 ring around it), and ``splits/pascal/val/foldN.txt``
    listing each fold's images as ``NAME__CC``. Returns the lists' sha256."""
    rng = np.random.default_rng(seed)
    voc = os.path.join(os.fspath(root), "VOC2012")
    lines: dict[int, list[str]] = {f: [] for f in range(4)}
    for label in range(1, 21):
        for i in range(per_class):
            name = f"2007_{label:02d}{i:04d}"
            image, mask = _scene(rng, size, label, ring=True)
            _write(os.path.join(voc, "JPEGImages", name + ".jpg"), _bytes(image, "JPEG"))
            _write(os.path.join(voc, "SegmentationClassAug", name + ".png"), _bytes(mask, "PNG", "L"))
            lines[(label - 1) // 5].append(f"{name}__{label:02d}")
    for fold, entries in lines.items():
        text = "\n".join(entries) + "\n"
        _write(os.path.join(os.fspath(splits), "pascal", "val", f"fold{fold}.txt"), text.encode())
    return _checksums(os.fspath(splits), [f"pascal/val/fold{f}.txt" for f in range(4)])


def write_coco_miniature(root: str | os.PathLike, splits: str | os.PathLike, *, per_class: int = 2,
                         size: tuple[int, int] = (24, 24), seed: int = 1) -> dict[str, str]:
    """``root/COCO2014/val2014/*.jpg`` and ``annotations/val2014/*.png`` (class ids 1..80) with
    ``per_class`` images of each class, and ``splits/coco/val/foldN.pkl`` (HSNet's form: a dict of every
    0-based class index -> image names, empty for the classes of other folds). Returns the sha256."""
    rng = np.random.default_rng(seed)
    coco = os.path.join(os.fspath(root), "COCO2014")
    pools: dict[int, list[str]] = {k: [] for k in range(80)}
    number = 0
    for label in range(1, 81):
        for _ in range(per_class):
            number += 1
            name = f"val2014/COCO_val2014_{number:012d}.jpg"
            image, mask = _scene(rng, size, label, ring=False)
            _write(os.path.join(coco, *name.split("/")), _bytes(image, "JPEG"))
            _write(os.path.join(coco, "annotations", *name[:-4].split("/")) + ".png", _bytes(mask, "PNG", "L"))
            pools[label - 1].append(name)
    for fold in range(4):
        fold_pools = {k: (v if k % 4 == fold else []) for k, v in pools.items()}
        _write(os.path.join(os.fspath(splits), "coco", "val", f"fold{fold}.pkl"), pickle.dumps(fold_pools, protocol=2))
    return _checksums(os.fspath(splits), [f"coco/val/fold{f}.pkl" for f in range(4)])


def davis_palette() -> list[int]:
    """The PASCAL VOC colour table DAVIS annotations use, flattened for ``putpalette``."""
    out = []
    for index in range(256):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def davis_objects(frame: int, size: tuple[int, int], shift: int) -> np.ndarray:
    """The id map of :func:`write_davis_miniature`'s frame: two rectangles moving right ``shift`` px a frame."""
    height, width = size
    ids = np.zeros(size, np.uint8)
    ids[height // 6:height // 2, 2 + shift * frame:2 + shift * frame + width // 4] = 1
    ids[height // 2 + 2:height - 2, width // 2 + shift * frame:width // 2 + shift * frame + width // 5] = 2
    return ids


def write_davis_miniature(root: str | os.PathLike, *, sequences: Sequence[str] = ("bike", "dogs"), frames: int = 6,
                          size: tuple[int, int] = (32, 32), shift: int = 1, seed: int = 2) -> str:
    """``root/DAVIS`` with ``JPEGImages/480p/<seq>/NNNNN.jpg``, ``Annotations/480p/<seq>/NNNNN.png``
    (palette PNGs, objects 1 and 2: :func:`davis_objects`) and ``ImageSets/2017/val.txt``."""
    rng = np.random.default_rng(seed)
    davis = os.path.join(os.fspath(root), "DAVIS")
    palette = davis_palette()
    for sequence in sequences:
        background = rng.integers(30, 110, (*size, 3)).astype(np.uint8)
        for t in range(frames):
            ids = davis_objects(t, size, shift)
            image = background.copy()
            image[ids == 1] = (230, 40, 40)
            image[ids == 2] = (40, 220, 60)
            _write(os.path.join(davis, "JPEGImages", "480p", sequence, f"{t:05d}.jpg"), _bytes(image, "JPEG"))
            mask = Image.fromarray(ids, mode="P")
            mask.putpalette(palette)
            buffer = io.BytesIO()
            mask.save(buffer, format="PNG")
            _write(os.path.join(davis, "Annotations", "480p", sequence, f"{t:05d}.png"), buffer.getvalue())
    _write(os.path.join(davis, "ImageSets", "2017", "val.txt"), ("\n".join(sequences) + "\n").encode())
    return davis
