"""Decoding images: files, PIL images and arrays of any mode become ``[H, W, 3]`` uint8 RGB.

The rules (each one what a user expects where transformers fails or misbehaves):

* files are opened with EXIF orientation applied and decoded completely, so a truncated file is
  reported here, naming it, instead of turning into a grey band or a failure later;
* RGBA/LA/P/CMYK/YCbCr become RGB through Pillow (alpha dropped), greyscale is repeated, 16-bit
  data is scaled to 8 bits (``/ 257``), ``"1"`` and bool are 0/255, float images in ``[0, 1]`` are
  scaled by 255 (transformers scales them down twice);
* numpy images may be HWC or CHW; an ambiguous shape (channels-sized on both ends) is read as HWC
  unless ``input_data_format`` says otherwise (transformers reads it as CHW).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..arrays import from_torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
CHANNELS_FIRST, CHANNELS_LAST = "channels_first", "channels_last"


class InputError(ValueError):
    """A problem with the user's input (a file, an image, a mask), reported in one line that names it."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file that does not exist."""


def describe(value: Any) -> str:
    """How to name an input in a message: its path, or its kind and shape."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Image.Image):
        return f"PIL {value.mode} image {value.size[0]}x{value.size[1]}"
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None else type(value).__name__


#: The largest image (in pixels) decoded by default: 200 megapixels (e.g. 14000 x 14000). Checked from
#: the file's header, before anything is decoded; Pillow's own decompression-bomb limit (89 megapixels
#: with a warning, 179 refused) is replaced by this one. See :func:`open_image`.
DEFAULT_MAX_PIXELS = 200_000_000
#: What one query of ``P`` pixels may take beside the model while it is read, answered and written
#: (decoding, the mask and the overlay at full size): at most ``14 P`` bytes (``tests/test_trust.py``
#: checks it on a 12000 x 12000 PNG; ``benchmarks/RESULTS.md`` has the measurement).
BYTES_PER_QUERY_PIXEL = 14
_pil_limit = threading.Lock()


def open_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               first_frame_only: bool = True) -> Image.Image:
    """Open and fully decode an image file (EXIF orientation applied); errors name the file.

    An image of more than ``max_pixels`` pixels is refused from its header, before decoding (``None``:
    no limit). ``first_frame_only=False`` returns the opened file undecoded, for reading an animation's
    frames one at a time (the caller closes it).
    """
    name = os.fspath(path)
    try:
        with _pil_limit:  # our limit instead of Pillow's (checked in Image.open)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(name)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        try:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise InputError(f"{name} is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the limit "
                                 f"of {max_pixels / 1e6:g} megapixels (--max-pixels)")
            if not first_frame_only:
                return image
            image.load()  # decodes everything: truncated and corrupt files fail here
            if getattr(image, "n_frames", 1) > 1:
                image = _first_frame(image)
            ImageOps.exif_transpose(image, in_place=True)  # no second copy of a large image
            return image
        except BaseException:
            image.close()
            raise
    except InputError:
        raise
    except FileNotFoundError:
        raise MissingInputError(f"no such image file: {name}") from None
    except IsADirectoryError:
        raise InputError(f"{name} is a folder, not an image file") from None
    except PermissionError:
        raise InputError(f"cannot read {name}: permission denied") from None
    except MemoryError:
        raise InputError(f"cannot read image {name}: not enough memory to decode it") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's errors for bad data
        reason = str(e) or type(e).__name__
        if "truncated" in reason.lower():
            reason = "the file is truncated (incomplete download or copy?)"
        raise InputError(f"cannot read image {name}: {reason}") from None


def _first_frame(image: Image.Image) -> Image.Image:
    """The decoded first frame of an animation, detached from its file (which is closed)."""
    with image:
        return image.copy()


def to_numpy(value: Any) -> np.ndarray:
    """numpy, jax or torch (CPU or not, bfloat16 too) -> numpy."""
    return value if isinstance(value, np.ndarray) else np.asarray(from_torch(value))


def integral_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Integer or bool pixel values -> uint8 the way a user expects (16-bit scaled, bool -> 0/255)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise InputError(f"{what} has negative pixel values (min {low})")
    if high <= 255:
        return array.astype(np.uint8)
    if high <= 65535:  # 16-bit data
        return ((array.astype(np.float64) / 257.0) + 0.5).astype(np.uint8)
    raise InputError(f"{what} has pixel values up to {high}; expected 8- or 16-bit data")


def float_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Float pixels in ``[0, 1]`` (scaled by 255) or ``[0, 255]`` -> rounded uint8."""
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what} contains NaN or infinite values")
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise InputError(f"{what} has float values in [{low:g}, {high:g}]; expected [0, 1] or [0, 255]")
    if high <= 1.0:
        array = array * 255.0
    return np.floor(array.astype(np.float64) + 0.5).astype(np.uint8)  # round, so that uint8 / 255 round-trips


_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> ``[H, W, 3]`` uint8."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode in _WIDE_GREY_MODES:
        grey = np.asarray(image)
        grey = float_to_uint8(grey, f"a PIL {mode} image") if mode == "F" else integral_to_uint8(grey, "image")
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "1":
        return np.repeat((np.asarray(image).astype(np.uint8) * 255)[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def infer_layout(shape: tuple[int, ...], input_data_format: str | None) -> str:
    """``channels_first`` or ``channels_last`` for a 3-D image array."""
    if input_data_format in (CHANNELS_FIRST, "first"):
        return CHANNELS_FIRST
    if input_data_format in (CHANNELS_LAST, "last"):
        return CHANNELS_LAST
    if input_data_format is not None:
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}")
    if shape[-1] in (1, 2, 3, 4):
        return CHANNELS_LAST  # also when ambiguous: HWC is what numpy/PIL/cv2 produce
    if shape[0] in (1, 2, 3, 4):
        return CHANNELS_FIRST
    raise InputError(f"cannot tell the channel axis of an image of shape {shape}; expected HWC or CHW with 1, 3 or "
                     f"4 channels (pass input_data_format=...)")


def array_to_hwc(array: np.ndarray, label: str, input_data_format: str | None = None) -> np.ndarray:
    """A 2-D or 3-D image array -> ``[H, W, 3]`` in its own dtype (grey repeated, alpha dropped)."""
    if array.ndim == 3:
        if infer_layout(array.shape, input_data_format) == CHANNELS_FIRST:
            array = np.moveaxis(array, 0, -1)
        channels = array.shape[-1]
        if channels == 1:
            array = np.repeat(array, 3, axis=-1)
        elif channels == 2:  # grey + alpha
            array = np.repeat(array[..., :1], 3, axis=-1)
        elif channels == 4:  # drop alpha, as Pillow's convert("RGB")
            array = array[..., :3]
        elif channels != 3:
            raise InputError(f"{label} has {channels} channels; expected 1, 3 or 4")
    elif array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    else:
        raise InputError(f"{label} must be 2-D (grey) or 3-D (HWC or CHW), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{label} is empty")
    return array


def to_rgb_uint8(image: Any, input_data_format: str | None = None, *, what: str = "image",
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any supported image (path, PIL image, numpy/jax/torch array) -> ``[H, W, 3]`` uint8; files of more
    than ``max_pixels`` pixels are refused before decoding (:func:`open_image`)."""
    if isinstance(image, (str, os.PathLike)):
        decoded = open_image(image, max_pixels=max_pixels)
        try:
            return pil_to_rgb(decoded)
        finally:
            decoded.close()  # the decoded pixels go now, not when the garbage collector gets to them
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    array = to_numpy(image)
    label = f"{what} ({describe(image)})"
    array = array_to_hwc(array, label, input_data_format)
    if np.issubdtype(array.dtype, np.floating):
        return float_to_uint8(array, label)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return integral_to_uint8(array, label)
    raise InputError(f"{label} has unsupported dtype {array.dtype}")
