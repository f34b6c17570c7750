"""SegGPT image processing with numpy and Pillow only: transformers' ``SegGptImageProcessorPil``, exactly.

Where transformers' processor is well defined (RGB images as PIL/uint8/integer-valued arrays, label
maps, RGB masks) the outputs are identical: PIL bicubic resize on uint8, ``x * (1/255)`` in float64 cast
to float32, per-channel ``(x - mean) / std`` in float32; masks use PIL nearest. Post-processing
reproduces its torch ``nearest`` resize (float32 scale) and palette argmin.

Where transformers fails or silently misbehaves, we do what a user expects instead:

* images of any mode become RGB: RGBA/LA/P/CMYK via Pillow's ``convert("RGB")`` (alpha dropped, as
  transformers does for file paths), greyscale repeated, 16-bit scaled to 8 bits (``/ 257``), ``"1"``
  and bool as 0/255, float images in ``[0, 1]`` scaled by 255 (transformers scales them down twice);
* numpy images may be HWC or CHW; an ambiguous shape (channels-sized on both ends) is read as HWC unless
  ``input_data_format`` says otherwise (transformers reads it as CHW);
* a 3-channel prompt mask is used as an RGB mask even with ``do_convert_rgb=True`` (transformers
  raises); bool masks are labels 0/1 (foreground 255 without a palette);
* a label above ``num_labels``, a negative label, or a non-integer label raises a ``ValueError`` that
  names the mask (transformers raises ``IndexError`` or wraps negative labels silently).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNELS_FIRST, CHANNELS_LAST = "channels_first", "channels_last"


def build_palette(num_labels: int) -> list[tuple[int, int, int]]:
    """Colour of each class id (0 = background, black), as transformers' ``build_palette`` and the
    Painter code (``int(n ** (1/3)) + 1`` levels per channel; the float cube root matters for n=64)."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 0:
        raise ValueError(f"num_labels must be a non-negative integer, got {num_labels!r}")
    num_labels = int(num_labels)
    base = int(num_labels ** (1 / 3)) + 1
    margin = 256 // base
    colours = [(0, 0, 0)]
    for location in range(num_labels):
        colours.append((255 - (location // base ** 2) * margin, 255 - ((location % base ** 2) // base) * margin,
                        255 - (location % base) * margin))
    return colours


class ProcessorOutput(dict):
    """A dict of arrays with attribute access (like transformers' ``BatchFeature``): ``model(**out)``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# ------------------------------------------------------------------------------------ decoding
def _describe(value: Any) -> str:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Image.Image):
        return f"PIL {value.mode} image {value.size[0]}x{value.size[1]}"
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None else type(value).__name__


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file (EXIF orientation applied); errors name the file."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            return image
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image file: {os.fspath(path)}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {os.fspath(path)}: {e}") from None


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
    return np.asarray(value)


def _integral_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Integer or bool pixel values -> uint8 the way a user expects (16-bit scaled, bool -> 0/255)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise ValueError(f"{what} has negative pixel values (min {low})")
    if high <= 255:
        return array.astype(np.uint8)
    if high <= 65535:  # 16-bit data
        return ((array.astype(np.float64) / 257.0) + 0.5).astype(np.uint8)
    raise ValueError(f"{what} has pixel values up to {high}; expected 8- or 16-bit data")


def _float_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contains NaN or infinite values")
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise ValueError(f"{what} has float values in [{low:g}, {high:g}]; expected [0, 1] or [0, 255]")
    if high <= 1.0:
        array = array * 255.0
    return np.floor(array.astype(np.float64) + 0.5).astype(np.uint8)  # round, so that uint8 / 255 round-trips


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        grey = np.asarray(image)
        grey = _float_to_uint8(grey, f"a PIL {mode} image") if mode == "F" else _integral_to_uint8(grey, "image")
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "1":
        return np.repeat((np.asarray(image).astype(np.uint8) * 255)[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def _infer_layout(shape: tuple[int, ...], input_data_format: str | None) -> str:
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
    raise ValueError(f"cannot tell the channel axis of an image of shape {shape}; expected HWC or CHW with 1, 3 or "
                     f"4 channels (pass input_data_format=...)")


def to_rgb_uint8(image: Any, input_data_format: str | None = None, *, what: str = "image") -> np.ndarray:
    """Any supported image -> ``[H, W, 3]`` uint8."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    array = _to_numpy(image)
    label = f"{what} ({_describe(image)})"
    if array.ndim == 3:
        if _infer_layout(array.shape, input_data_format) == CHANNELS_FIRST:
            array = np.moveaxis(array, 0, -1)
        channels = array.shape[-1]
        if channels == 1:
            array = np.repeat(array, 3, axis=-1)
        elif channels == 2:  # grey + alpha
            array = np.repeat(array[..., :1], 3, axis=-1)
        elif channels == 4:  # drop alpha, as Pillow's convert("RGB")
            array = array[..., :3]
        elif channels != 3:
            raise ValueError(f"{label} has {channels} channels; expected 1, 3 or 4")
    elif array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    else:
        raise ValueError(f"{label} must be 2-D (grey) or 3-D (HWC or CHW)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{label} is empty")
    if np.issubdtype(array.dtype, np.floating):
        return _float_to_uint8(array, label)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return _integral_to_uint8(array, label)
    raise ValueError(f"{label} has unsupported dtype {array.dtype}")


def to_label_map(mask: Any, *, what: str = "prompt mask", true_label: int = 1) -> np.ndarray | None:
    """A single-channel label map ``[H, W]`` (int64), or ``None`` if ``mask`` is a colour (RGB) mask.

    Boolean masks (numpy bool, PIL ``"1"``) become ``0`` / ``true_label``."""
    if isinstance(mask, (str, os.PathLike)):
        mask = open_image(mask)
    label = f"{what} ({_describe(mask)})"
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA", "HSV"):
            return None
        array = np.asarray(mask)  # L, P (palette indices), I;16, I, F, 1
    else:
        array = _to_numpy(mask)
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
        elif array.ndim == 3:
            return None
        elif array.ndim != 2:
            raise ValueError(f"{label} must be a 2-D label map or a 3-channel RGB mask")
    if array.dtype == bool:
        return array.astype(np.int64) * true_label
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{label} has non-integer values; a label map holds class ids 0..num_labels")
    elif not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{label} has unsupported dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"{label} has negative labels (min {array.min()})")
    return array


def mask_to_rgb(labels: np.ndarray, num_labels: int | None, *, what: str = "prompt mask") -> np.ndarray:
    """``[H, W]`` class ids -> ``[H, W, 3]`` uint8: palette colours, or the id repeated without a palette."""
    if num_labels is None:
        if labels.size and labels.max() > 255:
            raise ValueError(f"{what} has labels up to {labels.max()}; without num_labels they are used as grey "
                             f"levels and must be <= 255 (pass num_labels to use the class palette)")
        return np.repeat(labels.astype(np.uint8)[..., None], 3, axis=-1)
    palette = np.asarray(build_palette(num_labels), dtype=np.uint8)
    if labels.size and labels.max() > num_labels:
        found = sorted(int(v) for v in np.unique(labels[labels > num_labels])[:5])
        raise ValueError(f"{what} has labels {found} above num_labels={num_labels} (class ids must be 0..{num_labels}, "
                         f"0 = background)")
    return palette[labels]


# ------------------------------------------------------------------------------------ the processor
def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            out.extend(_as_list(item) if isinstance(item, (list, tuple)) else [item])
        return out
    array_like = not isinstance(value, (str, os.PathLike, Image.Image)) and hasattr(value, "shape")
    if array_like and len(value.shape) == 4:
        return list(value)
    return [value]


class SegGptImageProcessor:
    """Prepares queries, prompt images and prompt masks for the model; turns its output into class maps.

    Constructor arguments and defaults are those of ``transformers.SegGptImageProcessor``.
    """

    def __init__(self, do_resize: bool = True, size: dict[str, int] | int | Sequence[int] | None = None,
                 resample: int = Image.BICUBIC, do_rescale: bool = True, rescale_factor: float = 1 / 255,
                 do_normalize: bool = True, image_mean: float | Sequence[float] | None = None,
                 image_std: float | Sequence[float] | None = None, do_convert_rgb: bool = True,
                 num_labels: int | None = None, **kwargs: Any):
        if kwargs:
            raise TypeError(f"unknown SegGptImageProcessor arguments: {sorted(kwargs)}")
        self.do_resize = do_resize
        self.size = self._size(size if size is not None else {"height": 448, "width": 448})
        self.resample = resample
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = tuple(image_mean) if isinstance(image_mean, Sequence) else (
            IMAGENET_MEAN if image_mean is None else (float(image_mean),) * 3)
        self.image_std = tuple(image_std) if isinstance(image_std, Sequence) else (
            IMAGENET_STD if image_std is None else (float(image_std),) * 3)
        self.do_convert_rgb = do_convert_rgb
        self.num_labels = num_labels
        if num_labels is not None:
            build_palette(num_labels)  # validates

    @staticmethod
    def _size(size: Any) -> dict[str, int]:
        if isinstance(size, int):
            return {"height": size, "width": size}
        if isinstance(size, dict) and set(size) == {"height", "width"}:
            return {"height": int(size["height"]), "width": int(size["width"])}
        if isinstance(size, Sequence) and len(size) == 2:
            return {"height": int(size[0]), "width": int(size[1])}
        raise ValueError(f"size must be an int, (height, width) or {{'height': h, 'width': w}}, got {size!r}")

    # -------------------------------------------------------------------------- preprocessing
    def __call__(self, images: Any = None, prompt_images: Any = None, prompt_masks: Any = None,
                 **kwargs: Any) -> ProcessorOutput:
        return self.preprocess(images, prompt_images, prompt_masks, **kwargs)

    def preprocess(self, images: Any = None, prompt_images: Any = None, prompt_masks: Any = None, *,
                   do_resize: bool | None = None, size: Any = None, resample: int | None = None,
                   do_rescale: bool | None = None, rescale_factor: float | None = None,
                   do_normalize: bool | None = None, image_mean: Any = None, image_std: Any = None,
                   do_convert_rgb: bool | None = None, num_labels: int | None = None,
                   return_tensors: str | None = None, input_data_format: str | None = None) -> ProcessorOutput:
        """Each argument may be one image or a list (paths, PIL images, numpy/torch arrays HWC or CHW).

        Returns ``pixel_values``, ``prompt_pixel_values``, ``prompt_masks`` for the inputs given, as
        ``[N, 3, H, W]`` float32 arrays (``return_tensors="np"`` or ``"jax"``) or lists of arrays (None).
        """
        if images is None and prompt_images is None and prompt_masks is None:
            raise ValueError("at least one of images, prompt_images, prompt_masks must be given")
        if return_tensors not in (None, "np", "jax"):
            raise ValueError(f"return_tensors must be None, 'np' or 'jax', got {return_tensors!r}")
        options = dict(
            do_resize=self.do_resize if do_resize is None else do_resize,
            size=self.size if size is None else self._size(size),
            resample=self.resample if resample is None else resample,
            do_rescale=self.do_rescale if do_rescale is None else do_rescale,
            rescale_factor=self.rescale_factor if rescale_factor is None else rescale_factor,
            do_normalize=self.do_normalize if do_normalize is None else do_normalize,
            image_mean=self.image_mean if image_mean is None else image_mean,
            image_std=self.image_std if image_std is None else image_std,
        )
        convert = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        labels = self.num_labels if num_labels is None else num_labels
        out = ProcessorOutput()
        for key, value in (("pixel_values", images), ("prompt_pixel_values", prompt_images)):
            if value is not None:
                items = _as_list(value)
                out[key] = [self._finish(to_rgb_uint8(item, input_data_format, what=f"{key}[{i}]"), False, options)
                            for i, item in enumerate(items)]
        if prompt_masks is not None:
            rgb = []
            for i, mask in enumerate(_as_list(prompt_masks)):
                what = f"prompt_masks[{i}]"
                label_map = to_label_map(mask, what=what, true_label=1 if labels is not None else 255) if convert \
                    else None
                if label_map is None:
                    rgb.append(to_rgb_uint8(mask, input_data_format, what=what))
                else:
                    rgb.append(mask_to_rgb(label_map, labels, what=f"{what} ({_describe(mask)})"))
            out["prompt_masks"] = [self._finish(m, True, options) for m in rgb]
        for key in list(out):
            if return_tensors is not None:
                shapes = {a.shape for a in out[key]}
                if len(shapes) > 1:
                    raise ValueError(f"{key}: images of different sizes {sorted(shapes)} cannot be stacked; "
                                     "keep do_resize=True or use return_tensors=None")
                stacked = np.stack(out[key]) if out[key] else np.zeros((0, 3, *self._hw(options)), np.float32)
                if return_tensors == "jax":
                    import jax.numpy as jnp

                    stacked = jnp.asarray(stacked)
                out[key] = stacked
        return out

    @staticmethod
    def _hw(options: dict) -> tuple[int, int]:
        return options["size"]["height"], options["size"]["width"]

    def _finish(self, rgb: np.ndarray, is_mask: bool, options: dict) -> np.ndarray:
        """``[H, W, 3]`` uint8 -> ``[3, h, w]``: resize (PIL), rescale (float64 -> float32), normalise."""
        if options["do_resize"]:
            height, width = self._hw(options)
            resample = Image.NEAREST if is_mask else options["resample"]
            rgb = np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample, reducing_gap=None))
        x = np.ascontiguousarray(rgb.transpose(2, 0, 1))
        if options["do_rescale"]:
            x = (x.astype(np.float64) * options["rescale_factor"]).astype(np.float32)
        if options["do_normalize"]:
            if not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            mean = np.asarray(options["image_mean"], dtype=x.dtype).reshape(-1, 1, 1)
            std = np.asarray(options["image_std"], dtype=x.dtype).reshape(-1, 1, 1)
            x = (x - mean) / std
        return x

    # -------------------------------------------------------------------------- post-processing
    def post_process_semantic_segmentation(self, outputs: Any, target_sizes: Sequence[Sequence[int]] | None = None,
                                           num_labels: int | None = None,
                                           return_segmentation_scores: bool = False) -> list:
        """Painted query halves -> class maps, as transformers' method (numpy in, numpy out).

        ``outputs`` is the model output (anything with ``pred_masks``) or the ``[B, 3, H, W]`` array
        itself. Each map is ``[h, w]``: int64 class ids (nearest palette colour) with ``num_labels``,
        else the int32 grey level; at ``target_sizes[i]`` (torch ``nearest``) if given. With
        ``return_segmentation_scores`` each item is ``{"segmentation", "segmentation_scores"}``, the
        scores being ``-squared distance`` to each palette colour, ``[num_labels + 1, h, w]``.
        """
        masks = painted_query(outputs, self.image_mean, self.image_std)  # [B, 3, h, w] float32 in [0, 255]
        if target_sizes is not None and len(target_sizes) != len(masks):
            raise ValueError(f"target_sizes has {len(target_sizes)} entries for a batch of {len(masks)}")
        palette = None
        if num_labels is not None:
            palette = np.asarray(build_palette(num_labels), dtype=np.float32)
        results = []
        for i, mask in enumerate(masks):
            if target_sizes is not None:
                height, width = _target_size(target_sizes[i])
                mask = mask[:, torch_nearest_index(mask.shape[1], height)][:, :, torch_nearest_index(mask.shape[2],
                                                                                                       width)]
            if palette is not None:
                segmentation, scores = nearest_palette(mask, palette)
            else:
                segmentation = (mask.sum(axis=0, dtype=np.float32) / np.float32(3)).astype(np.int32)
                scores = None
            results.append({"segmentation": segmentation, "segmentation_scores": scores}
                           if return_segmentation_scores else segmentation)
        return results


def _target_size(size: Any) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {tuple(size)}")
    return height, width


def painted_query(outputs: Any, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """The query half of ``pred_masks`` un-normalised to ``[0, 255]`` (float32, ``[B, 3, h, w]``)."""
    pred = getattr(outputs, "pred_masks", outputs)
    if pred is None:
        raise ValueError("outputs has no pred_masks")
    pred = _to_numpy(pred)
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"pred_masks must be [batch, 3, height, width], got shape {pred.shape}")
    pred = pred[:, :, pred.shape[2] // 2:, :].astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.clip((pred * std32 + mean32) * np.float32(255), 0, 255)


def torch_nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """Source indices of ``torch.nn.functional.interpolate(mode="nearest")`` along one axis."""
    if size_out == size_in:
        return np.arange(size_out)
    if size_out == 2 * size_in:
        return np.arange(size_out) >> 1
    scale = np.float32(size_in) / np.float32(size_out)
    index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, size_in - 1)


def nearest_palette(mask: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[3, h, w]`` colours -> (int64 ids of the nearest palette colour, ``-squared distances``)."""
    pixels = mask.transpose(1, 2, 0)[:, :, None, :]  # [h, w, 1, 3]
    diff = pixels - palette[None, None]  # [h, w, L+1, 3]
    distance = (diff * diff).sum(-1)
    return distance.argmin(-1), -distance.transpose(2, 0, 1)
