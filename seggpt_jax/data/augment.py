"""Paired augmentations: the same crop and flip on an image and its mask, colour jitter on the image."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance


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
