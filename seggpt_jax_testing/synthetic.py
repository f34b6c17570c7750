"""Synthetic datasets for tests and benchmarks: coloured shapes on texture, with their masks."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image


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
