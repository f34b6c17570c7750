"""Files in and out for the command line: input lists, streamed video frames, mask PNGs, overlays,
and overlay animations written frame by frame."""

from __future__ import annotations

import fractions
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageSequence

from ..files import written_by_us
from .decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, InputError, open_image
from .masks import build_palette

ANIMATION_EXTENSIONS = (".gif", ".webp", ".png", ".apng", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")

# Distinct colours for overlays (class id 1, 2, ...); class 0 (background) is left unpainted.
_OVERLAY_COLOURS = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200),
    (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)], dtype=np.uint8)


def folder_images(folder: str) -> tuple[list[str], int]:
    """A folder's images (sorted, hidden files and this tool's own outputs left out), and how many
    outputs were left out."""
    cache: dict = {}
    found, skipped = [], 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
            continue
        if written_by_us(path, cache):
            skipped += 1
            continue
        found.append(path)
    return found, skipped


def collect_images(paths: Sequence[str]) -> list[str]:
    """Files as given, folders expanded to their images (sorted; files this tool wrote are skipped)."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            entries, skipped = folder_images(path)
            if not entries:
                note = f" besides {skipped} outputs of seggpt-jax" if skipped else ""
                raise InputError(f"folder {path} holds no images{note} ({', '.join(IMAGE_EXTENSIONS)})")
            found.extend(entries)
        elif os.path.isfile(path):
            found.append(path)
        elif os.path.lexists(path):
            raise InputError(f"{path} is not a file or folder (a broken link?)")
        else:
            raise InputError(f"no such file or folder: {path}")
    if not found:
        raise InputError("no input images given")
    return found


# ------------------------------------------------------------------------------------ frames
def frame_rate(source: str) -> float | None:
    """Frames per second of a video file or an animation (from its frame durations), if it says."""
    lower = source.lower()
    if os.path.isfile(source) and lower.endswith(VIDEO_EXTENSIONS):
        av = _import_av(source)
        try:
            with av.open(source) as container:
                if not container.streams.video:
                    raise InputError(f"{source} holds no video stream")
                rate = container.streams.video[0].average_rate
                return float(rate) if rate else None
        except av.error.FFmpegError as e:
            raise InputError(f"cannot read video {source}: {e}") from None
    if os.path.isfile(source) and lower.endswith(ANIMATION_EXTENSIONS):
        try:
            with Image.open(source) as image:
                duration = image.info.get("duration")
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read frames from {source}: {e}") from None
        return 1000.0 / duration if duration else None
    return None


def frame_names(source: str | os.PathLike) -> list[str] | None:
    """The frame names of a folder of frames (its image files' names, sorted), or ``None`` for a video
    file or an animation (whose frames are named by their number)."""
    source = os.fspath(source)
    return [os.path.basename(p) for p in collect_images([source])] if os.path.isdir(source) else None


def iter_frames(source: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Iterator[tuple[str, Any]]:
    """``(name, frame)`` one at a time from a folder of images (the name is the file's name, the frame
    its path, decoded by the consumer, so one unreadable file fails alone), an animated
    GIF/WebP/APNG/TIFF, or a video file (PyAV, the optional ``video`` extra; frames named ``00000``,
    ``00001``, ...). Nothing is read ahead."""
    source = os.fspath(source)
    if os.path.isdir(source):
        for path in collect_images([source]):
            yield os.path.basename(path), path
        return
    if not os.path.isfile(source):
        raise InputError(f"no such file or folder: {source}")
    if source.lower().endswith(VIDEO_EXTENSIONS):
        yield from _video_frames(source)
        return
    try:
        animation = open_image(source, max_pixels=max_pixels, first_frame_only=False)
    except InputError as e:
        raise InputError(f"cannot read frames from {source}: {e}") from None
    with animation:
        index = 0
        try:
            for index, frame in enumerate(ImageSequence.Iterator(animation)):
                yield f"{index:05d}", frame.convert("RGB")
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read frame {index} of {source}: {e}") from None


def _import_av(path: str):
    try:
        import av
    except ImportError:
        raise InputError(f"{path}: video files need the optional video extra: pip install 'seggpt-jax[video]' "
                         "(or pass a folder of frames or a GIF)") from None
    return av


def _video_frames(path: str) -> Iterator[tuple[str, np.ndarray]]:
    av = _import_av(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
                raise InputError(f"{path} holds no video stream (only {kinds})")
            for index, frame in enumerate(container.decode(video=0)):
                yield f"{index:05d}", frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise InputError(f"cannot decode video {path}: {e}") from None


# ------------------------------------------------------------------------------------ writers
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


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, *, rows: int = 256) -> np.ndarray:
    """Mask colours blended over the photo (background untouched), with a dark outline on every edge.

    Works through ``rows`` rows at a time, so that beside the photo and the result it holds only a few
    rows of temporaries, whatever the image's size.
    """
    height = image.shape[0]
    out = np.empty(image.shape, np.uint8)
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        low, high = max(0, start - 1), min(height, stop + 1)  # one row of context each side, for the edges
        classes = mask[low:high].astype(np.int64)
        inside = classes > 0
        colours = _OVERLAY_COLOURS[(classes - 1) % len(_OVERLAY_COLOURS)].astype(np.float32)
        block = image[low:high].astype(np.float32)
        block[inside] = (1 - alpha) * block[inside] + alpha * colours[inside]
        edge = np.zeros(classes.shape, dtype=bool)
        edge[:-1] |= classes[:-1] != classes[1:]
        edge[1:] |= classes[1:] != classes[:-1]
        edge[:, :-1] |= classes[:, :-1] != classes[:, 1:]
        edge[:, 1:] |= classes[:, 1:] != classes[:, :-1]
        outline = np.where(inside[..., None], colours * 0.5, np.float32(255))
        block[edge] = outline[edge]
        out[start:stop] = np.clip(block[start - low:start - low + stop - start], 0, 255).astype(np.uint8)
    return out


def fit_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``frame`` scaled to fit ``(height, width)`` keeping its aspect ratio, centred on black (for
    animations of frames of mixed sizes)."""
    height, width = size
    if frame.shape[:2] == (height, width):
        return frame
    scale = min(height / frame.shape[0], width / frame.shape[1])
    new_h, new_w = max(1, round(frame.shape[0] * scale)), max(1, round(frame.shape[1] * scale))
    resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BILINEAR))
    canvas = np.zeros((height, width, 3), np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


class Mp4Writer:
    """H.264 frames appended one at a time (PyAV); the first frame fixes the size (even, as H.264 needs),
    later frames of another size are fitted into it. Write to a temporary path and rename when done."""

    def __init__(self, path: str, fps: float):
        self._av = _import_av(path)
        self._path, self._fps = path, fractions.Fraction(fps).limit_denominator(1000)
        self._container = self._av.open(path, mode="w", format="mp4")
        self._stream = None
        self.size: tuple[int, int] | None = None

    def add(self, frame: np.ndarray) -> None:
        if self._stream is None:
            height, width = frame.shape[0] - frame.shape[0] % 2, frame.shape[1] - frame.shape[1] % 2
            self.size = (max(height, 2), max(width, 2))
            self._stream = self._container.add_stream("libx264", rate=self._fps)
            self._stream.height, self._stream.width = self.size
            self._stream.pix_fmt = "yuv420p"
        picture = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(fit_frame(frame, self.size)), format="rgb24")
        for packet in self._stream.encode(picture):
            self._container.mux(packet)

    def close(self) -> None:
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()


class GifWriter:
    """An animated GIF. Pillow writes a GIF in one go, so the frames are kept, as 1-byte palette
    images (a quarter of the RGB size), until :meth:`close`; prefer mp4 for long clips."""

    def __init__(self, path: str, fps: float):
        self._path, self._duration = path, max(1, round(1000 / fps))
        self._frames: list[Image.Image] = []
        self.size: tuple[int, int] | None = None

    def add(self, frame: np.ndarray) -> None:
        if self.size is None:
            self.size = frame.shape[:2]
        self._frames.append(Image.fromarray(fit_frame(frame, self.size)).quantize(colors=256))

    def close(self) -> None:
        if self._frames:
            self._frames[0].save(self._path, format="GIF", save_all=True, append_images=self._frames[1:],
                                 duration=self._duration, loop=0)
        self._frames = []
