"""Files in and out for the command line: image lists, video frames, mask PNGs, overlays, animations.

Every writer goes through :func:`atomic_save`: a file appears complete or not at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageSequence

from ..files import atomic_save
from .processor import build_palette, open_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
ANIMATION_EXTENSIONS = (".gif", ".webp", ".png", ".apng", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")

# Distinct colours for overlays (class id 1, 2, ...); class 0 (background) is left unpainted.
_OVERLAY_COLOURS = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200),
    (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)], dtype=np.uint8)


class InputError(ValueError):
    """A problem with the user's files, reported in one line."""


def collect_images(paths: Sequence[str]) -> list[str]:
    """Files as given, folders expanded to their images (sorted); every path must exist."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            entries = sorted(os.path.join(path, name) for name in os.listdir(path)
                             if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))
            if not entries:
                raise InputError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            found.extend(entries)
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise InputError(f"no such file or folder: {path}")
    if not found:
        raise InputError("no input images given")
    return found


def check_readable(path: str) -> tuple[int, int]:
    """Open the header; returns (width, height). Raises InputError naming the file."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise InputError(f"cannot read image {path}: {e}") from None


def iter_frames(source: str | os.PathLike) -> Iterator[tuple[str, Image.Image]]:
    """``(name, RGB frame)`` from a folder of images, an animated GIF/WebP/APNG/TIFF, or a video file
    (with the optional ``video`` extra, PyAV)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        for path in collect_images([source]):
            yield os.path.splitext(os.path.basename(path))[0], open_image(path).convert("RGB")
        return
    if not os.path.isfile(source):
        raise InputError(f"no such file or folder: {source}")
    lower = source.lower()
    if lower.endswith(VIDEO_EXTENSIONS):
        yield from _video_frames(source)
        return
    try:
        animation = Image.open(source)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read frames from {source}: {e}") from None
    with animation:
        for index, frame in enumerate(ImageSequence.Iterator(animation)):
            yield f"{index:05d}", frame.convert("RGB")


def _video_frames(path: str) -> Iterator[tuple[str, Image.Image]]:
    try:
        import av
    except ImportError:
        raise InputError(f"{path}: reading video files needs the optional video extra: "
                         "pip install 'seggpt-jax[video]' (or pass a folder of frames or a GIF)") from None
    try:
        with av.open(path) as container:
            for index, frame in enumerate(container.decode(video=0)):
                yield f"{index:05d}", frame.to_image().convert("RGB")
    except av.error.FFmpegError as e:
        raise InputError(f"cannot decode video {path}: {e}") from None


def mask_image(mask: np.ndarray, num_labels: int | None) -> Image.Image:
    """Binary masks as 0/255 greyscale; class maps as a palette PNG whose indices are the class ids."""
    if mask.dtype == bool:
        return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    if mask.size and mask.max() > 255:
        raise ValueError(f"class ids up to {mask.max()} do not fit a palette PNG")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    colours = build_palette(num_labels if num_labels is not None else int(mask.max(initial=0)))
    flat = [value for colour in colours for value in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Mask colours blended over the photo (background untouched), with a dark outline on every edge."""
    classes = mask.astype(np.int64)
    out = image.astype(np.float32).copy()
    painted = classes > 0
    colours = _OVERLAY_COLOURS[(classes - 1) % len(_OVERLAY_COLOURS)].astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * colours[painted]
    edge = np.zeros(classes.shape, dtype=bool)
    edge[:-1] |= classes[:-1] != classes[1:]
    edge[1:] |= classes[1:] != classes[:-1]
    edge[:, :-1] |= classes[:, :-1] != classes[:, 1:]
    edge[:, 1:] |= classes[:, 1:] != classes[:, :-1]
    outline = np.where(painted[..., None], colours * 0.5, np.float32(255))
    out[edge] = outline[edge]
    return np.clip(out, 0, 255).astype(np.uint8)


def save_animation(path: str, frames: Sequence[np.ndarray], duration_ms: int = 100) -> None:
    images = [Image.fromarray(f) for f in frames]
    fmt = {".gif": "GIF", ".webp": "WEBP", ".png": "PNG", ".apng": "PNG"}.get(os.path.splitext(path)[1].lower(), "GIF")
    atomic_save(path, lambda tmp: images[0].save(tmp, format=fmt, save_all=True, append_images=images[1:],
                                                 duration=duration_ms, loop=0))
