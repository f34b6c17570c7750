"""SegGPT image processing with numpy and Pillow only: transformers' ``SegGptImageProcessorPil``, exactly.

Where transformers' processor is well defined (RGB images as PIL/uint8/integer-valued arrays, label
maps, RGB masks with ``do_convert_rgb=False``) the outputs are identical: PIL bicubic resize on uint8,
``x * (1/255)`` in float64 cast to float32, per-channel ``(x - mean) / std`` in float32; masks use PIL
nearest. Post-processing reproduces its torch ``nearest`` resize (float32 scale) and palette argmin.

Where transformers fails or silently misbehaves, we do what a user expects instead: images of any
mode and layout are decoded by :mod:`seggpt_jax.imaging.decode`, and prompt masks with
``do_convert_rgb=True`` follow the one mask rule of :mod:`seggpt_jax.imaging.masks` (binary levels
without ``num_labels``; class ids, palette colours or an explicit ``colour_map`` with it). The
differences that remain:

* a 3-channel prompt mask is accepted with ``do_convert_rgb=True`` (transformers raises): as its own
  levels without ``num_labels``, as palette colours (or grey class ids) with it;
* masks that hold only 0 and 1 (and bool masks) are scaled to 0/255 in binary mode (transformers
  feeds 0/1, a black mask);
* a label above ``num_labels``, a negative or non-integer label, or a colour outside the palette
  raises an error that names the mask (transformers raises ``IndexError`` or wraps negative labels).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .decode import describe, to_numpy, to_rgb_uint8
from .masks import ColourMap, build_palette, prompt_picture

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

class ProcessorOutput(dict):
    """A dict of arrays with attribute access (like transformers' ``BatchFeature``): ``model(**out)``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


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
                   return_tensors: str | None = None, input_data_format: str | None = None,
                   colour_map: ColourMap | dict | str | None = None) -> ProcessorOutput:
        """Each argument may be one image or a list (paths, PIL images, numpy/torch arrays HWC or CHW).

        ``colour_map`` (ours): an explicit colour -> class id mapping for RGB prompt masks in another
        palette (see :class:`~seggpt_jax.imaging.masks.ColourMap`; ``"voc"`` for PASCAL VOC colours).

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
                if convert:  # the mask rule: binary levels, or class ids painted with the palette
                    rgb.append(prompt_picture(mask, labels, colour_map=colour_map, what=what))
                else:  # RGB pictures as given, as transformers
                    rgb.append(to_rgb_uint8(mask, input_data_format, what=what))
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
        palette = np.asarray(build_palette(num_labels), dtype=np.float32) if num_labels is not None else None
        results = []
        for i, mask in enumerate(masks):
            size = _target_size(target_sizes[i]) if target_sizes is not None else None
            if palette is not None:
                segmentation, scores = classes_from_painted(mask, palette, size,
                                                            return_scores=return_segmentation_scores)
            else:  # the grey level of each pixel, as transformers
                segmentation, scores = (resize_nearest(mask, size).sum(axis=0, dtype=np.float32)
                                        / np.float32(3)).astype(np.int32), None
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
    pred = to_numpy(pred)
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


def resize_nearest(picture: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """``[C, h, w]`` -> ``[C, H, W]`` with torch's ``nearest`` rule (no-op without a size)."""
    if size is None:
        return picture
    rows, cols = torch_nearest_index(picture.shape[1], size[0]), torch_nearest_index(picture.shape[2], size[1])
    return picture[:, rows][:, :, cols]


def classes_from_painted(painted: np.ndarray, palette: np.ndarray, size: tuple[int, int] | None = None, *,
                         return_scores: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """A painted ``[3, h, w]`` answer (``[0, 255]``) -> int64 class ids of the nearest palette colour, and
    optionally the ``[num_labels + 1, H, W]`` scores (``-squared distance``), at ``size`` (torch nearest).

    The class is decided at the model's resolution and then resized: nearest selection commutes with
    the per-pixel argmin, so this equals transformers, which resizes first.
    """
    pixels = painted.transpose(1, 2, 0)[:, :, None, :]  # [h, w, 1, 3]
    diff = pixels - palette[None, None]  # [h, w, L+1, 3]
    distance = (diff * diff).sum(-1)  # [h, w, L+1]
    classes = resize_nearest(distance.argmin(-1)[None], size)[0]
    scores = resize_nearest(-distance.transpose(2, 0, 1), size).astype(np.float32) if return_scores else None
    return classes, scores
