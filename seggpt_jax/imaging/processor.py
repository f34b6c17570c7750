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
  raises an error that names the mask (transformers raises ``IndexError`` or wraps negative labels);
* ``segmentation_maps=`` (the name in the BAAI/seggpt-vit-large model card) is accepted as
  ``prompt_masks=`` (transformers 5 refuses it);
* post-processing returns numpy arrays (transformers: torch tensors), whatever the outputs hold;
* ``from_pretrained`` on a folder without ``preprocessor_config.json`` uses the defaults (transformers
  raises); invalid values in the file are refused naming the key (transformers fails later, or not).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..files import write_json
from ..hub import resolve_file
from .decode import to_numpy, to_rgb_uint8
from .masks import ColourMap, build_palette, class_ids, labels_to_rgb, prompt_picture

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG_NAME = "preprocessor_config.json"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

class ProcessorOutput(dict):
    """A dict of arrays with attribute access (like transformers' ``BatchFeature``): ``model(**out)``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args: Any, **kwargs: Any) -> "ProcessorOutput":
        """transformers' ``BatchFeature.to``: torch tensors moved or cast (``.to("cuda")``,
        ``.to(torch.float16)``); numpy and jax arrays are returned as they are."""
        return ProcessorOutput({k: v.to(*args, **kwargs) if hasattr(v, "to") else v for k, v in self.items()})


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


#: transformers' processor options and their defaults (``SegGptImageProcessor``'s class attributes).
DEFAULTS: dict[str, Any] = {
    "do_resize": True, "size": {"height": 448, "width": 448}, "resample": Image.Resampling.BICUBIC,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD, "do_convert_rgb": True, "num_labels": None,
}
#: The filters transformers' ``resample`` names (``PILImageResampling``), by value.
_FILTERS = {int(f): f for f in (Image.Resampling.NEAREST, Image.Resampling.LANCZOS, Image.Resampling.BILINEAR,
                                Image.Resampling.BICUBIC, Image.Resampling.BOX, Image.Resampling.HAMMING)}
#: Keys transformers writes into ``preprocessor_config.json`` that are not options.
_META_KEYS = frozenset({"image_processor_type", "processor_class"})


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _size(value: Any) -> dict[str, int]:
    if _is_int(value):
        height = width = value
    elif isinstance(value, dict) and set(value) == {"height", "width"}:
        height, width = value["height"], value["width"]
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        height, width = value
    else:
        height = width = None
    if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
        raise ValueError(f"size must be a positive int, (height, width) or {{'height': h, 'width': w}}, got {value!r}")
    return {"height": int(height), "width": int(width)}


def _channels(key: str, value: Any) -> tuple[float, float, float]:
    if _is_number(value):
        values = (float(value),) * 3
    elif (isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str) and len(value) == 3
          and all(_is_number(v) for v in value)):
        values = tuple(float(v) for v in value)
    else:
        raise ValueError(f"{key} must be a number or 3 numbers (one per RGB channel), got {value!r}")
    if key == "image_std" and 0 in values:
        raise ValueError(f"image_std must be non-zero, got {value!r}")
    return values


def _option(key: str, value: Any) -> Any:
    """One processor option, checked and normalised; errors name the key."""
    if key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return bool(value)
    if key == "size":
        return _size(value)
    if key == "resample":
        if not _is_int(value) or int(value) not in _FILTERS:
            names = ", ".join(f"{n} ({f.name})" for n, f in sorted(_FILTERS.items()))
            raise ValueError(f"resample must be one of {names}, got {value!r}")
        return _FILTERS[int(value)]
    if key == "rescale_factor":
        if not _is_number(value) or value <= 0:
            raise ValueError(f"rescale_factor must be a positive number, got {value!r}")
        return float(value)
    if key in ("image_mean", "image_std"):
        return _channels(key, value)
    # num_labels
    if value is not None:
        build_palette(value)  # raises naming num_labels
    return None if value is None else int(value)


class SegGptImageProcessor:
    """Prepares queries, prompt images and prompt masks for the model; turns its output into class maps.

    Constructor arguments and defaults are those of ``transformers.SegGptImageProcessor``;
    :meth:`from_pretrained` and :meth:`save_pretrained` read and write its ``preprocessor_config.json``.
    """

    def __init__(self, do_resize: bool = True, size: dict[str, int] | int | Sequence[int] | None = None,
                 resample: int = Image.Resampling.BICUBIC, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: float | Sequence[float] | None = None, image_std: float | Sequence[float] | None = None,
                 do_convert_rgb: bool = True, num_labels: int | None = None, **kwargs: Any):
        if kwargs:
            raise TypeError(f"unknown SegGptImageProcessor arguments: {sorted(kwargs)}")
        given = dict(do_resize=do_resize, size=size, resample=resample, do_rescale=do_rescale,
                     rescale_factor=rescale_factor, do_normalize=do_normalize, image_mean=image_mean,
                     image_std=image_std, do_convert_rgb=do_convert_rgb, num_labels=num_labels)
        for key, value in given.items():  # None: transformers' default
            setattr(self, key, _option(key, DEFAULTS[key] if value is None else value))

    # -------------------------------------------------------------------------- preprocessor_config.json
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, **overrides: Any) -> "SegGptImageProcessor":
        """Read transformers' ``preprocessor_config.json`` from a local folder (or the folder of a file
        in it, or the ``.json`` file itself) or a Hub repo id, through the huggingface_hub cache with
        the offline detection, cache fallback and errors of ``SegGptForImageSegmentation.from_pretrained``.

        A folder or repo without the file gives the defaults (logged). Keys that are not options are
        ignored (logged at debug level). ``overrides`` (constructor arguments) replace the file's values.

        Raises:
            ModelNotFoundError: the folder does not exist, or the repo is neither on the Hub nor cached.
            ValueError: the file is not a JSON object, or holds an invalid value (naming the file and key).
        """

        path = os.path.expanduser(os.fspath(name_or_path))
        if not (os.path.isfile(path) and path.endswith(".json")):
            path = resolve_file(path, PROCESSOR_CONFIG_NAME, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only, token=token, required=False)
        if path is None:
            logger.info("%s has no %s: using the default processor settings", os.fspath(name_or_path),
                        PROCESSOR_CONFIG_NAME)
            return cls(**overrides)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(DEFAULTS) - _META_KEYS)
        if unknown:
            logger.debug("ignoring keys of %s that are not SegGPT processor options: %s", path, ", ".join(unknown))
        kind = data.get("image_processor_type")
        if kind is not None and not str(kind).startswith("SegGptImageProcessor"):
            logger.warning("%s is for %s, not SegGptImageProcessor; reading its SegGPT options anyway", path, kind)
        try:
            options = {key: _option(key, value) for key, value in data.items() if key in DEFAULTS and value is not None}
        except ValueError as e:
            raise ValueError(f"invalid {path}: {e}") from None
        return cls(**{**options, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegGptImageProcessor":
        """The processor of :meth:`to_dict`'s output (other keys ignored)."""
        return cls(**{key: value for key, value in data.items() if key in DEFAULTS})

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, SegGptImageProcessor) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        """The options under transformers' ``preprocessor_config.json`` keys (what transformers writes)."""
        out: dict[str, Any] = {
            "do_convert_rgb": self.do_convert_rgb, "do_normalize": self.do_normalize, "do_rescale": self.do_rescale,
            "do_resize": self.do_resize, "image_mean": list(self.image_mean),
            "image_processor_type": "SegGptImageProcessor", "image_std": list(self.image_std),
            "resample": int(self.resample), "rescale_factor": self.rescale_factor, "size": dict(self.size),
        }
        if self.num_labels is not None:
            out["num_labels"] = self.num_labels
        return out

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``preprocessor_config.json`` into ``save_directory`` (created if needed) atomically,
        leaving its other files alone; transformers' ``from_pretrained`` reads it. Returns its path."""
        directory = os.fspath(save_directory)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise NotADirectoryError(f"save_pretrained needs a directory, but {directory} is a file")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
        write_json(path, self.to_dict())
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True)}"

    # -------------------------------------------------------------------------- preprocessing
    def __call__(self, images: Any = None, prompt_images: Any = None, prompt_masks: Any = None,
                 **kwargs: Any) -> ProcessorOutput:
        return self.preprocess(images, prompt_images, prompt_masks, **kwargs)

    def preprocess(self, images: Any = None, prompt_images: Any = None, prompt_masks: Any = None, *,
                   segmentation_maps: Any = None, do_resize: bool | None = None, size: Any = None,
                   resample: int | None = None, do_rescale: bool | None = None, rescale_factor: float | None = None,
                   do_normalize: bool | None = None, image_mean: Any = None, image_std: Any = None,
                   do_convert_rgb: bool | None = None, num_labels: int | None = None,
                   return_tensors: str | None = None, input_data_format: str | None = None,
                   colour_map: ColourMap | dict | str | None = None) -> ProcessorOutput:
        """Each argument may be one image or a list (paths, PIL images, numpy/torch arrays HWC or CHW).

        ``segmentation_maps`` is ``prompt_masks`` under the name of the BAAI/seggpt-vit-large model card.
        ``colour_map`` (ours): an explicit colour -> class id mapping for RGB prompt masks in another
        palette (see :class:`~seggpt_jax.imaging.masks.ColourMap`; ``"voc"`` for PASCAL VOC colours).

        Returns ``pixel_values``, ``prompt_pixel_values``, ``prompt_masks`` for the inputs given, as
        ``[N, 3, H, W]`` float32 arrays (``return_tensors="np"``, ``"jax"``, or ``"pt"`` for torch
        tensors) or lists of arrays (None). torch is imported only for ``"pt"``.
        """
        if segmentation_maps is not None:
            if prompt_masks is not None:
                raise ValueError("give prompt_masks or segmentation_maps (its older name), not both")
            prompt_masks = segmentation_maps
        if images is None and prompt_images is None and prompt_masks is None:
            raise ValueError("at least one of images, prompt_images, prompt_masks must be given")
        if return_tensors not in (None, "np", "jax", "pt"):
            raise ValueError(f"return_tensors must be None, 'np', 'jax' or 'pt', got {return_tensors!r}")
        if return_tensors == "pt":
            try:
                import torch
            except ImportError:
                raise ImportError('return_tensors="pt" needs torch, which is not installed: use return_tensors="np" '
                                  'or "jax", or install torch') from None
        given = dict(do_resize=do_resize, size=size, resample=resample, do_rescale=do_rescale,
                     rescale_factor=rescale_factor, do_normalize=do_normalize, image_mean=image_mean,
                     image_std=image_std, do_convert_rgb=do_convert_rgb, num_labels=num_labels)
        options = {key: getattr(self, key) if value is None else _option(key, value) for key, value in given.items()}
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
                if options["do_convert_rgb"]:  # transformers' reading: levels as given, or the palette's colours
                    rgb.append(prompt_picture(mask, options["num_labels"], colour_map=colour_map, what=what,
                                              transformers=True))
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
                elif return_tensors == "pt":
                    stacked = torch.from_numpy(stacked)
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
        """Painted query halves -> class maps, as transformers' method (numpy arrays out).

        ``outputs`` is the model output (anything with ``pred_masks``: ours, or transformers' holding
        torch tensors) or the ``[B, 3, H, W]`` array itself (numpy, jax or torch). Each map is
        ``[h, w]``: int64 class ids (nearest palette colour) with ``num_labels``, else the int32 grey
        level; at ``target_sizes[i]`` (torch ``nearest``) if given. With ``return_segmentation_scores``
        each item is ``{"segmentation", "segmentation_scores"}``, the scores being ``-squared
        distance`` to each palette colour, ``[num_labels + 1, h, w]``.
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

    def get_palette(self, num_labels: int) -> list[tuple[int, int, int]]:
        """transformers' ``get_palette``: the colour of each class id ``0..num_labels`` (0 = background, black)."""
        return build_palette(num_labels)

    def mask_to_rgb(self, mask: Any, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """transformers' ``mask_to_rgb``: a ``[H, W]`` (or ``[1, H, W]``) class-id map -> ``[3, H, W]`` uint8,
        the ``palette`` colour of each id, or without a palette the id repeated as a grey level.

        Unlike transformers, ids outside the palette (or above 255 without one) raise an error."""
        mask = to_numpy(mask)
        if mask.ndim == 3 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.ndim != 2:
            raise ValueError(f"mask must be [height, width] or [1, height, width], got shape {mask.shape}")
        if palette is None:
            return np.ascontiguousarray(labels_to_rgb(mask, None, what="mask").transpose(2, 0, 1))
        colours = np.asarray(palette)
        if colours.ndim != 2 or colours.shape[1] != 3 or not len(colours) or colours.min() < 0 or colours.max() > 255:
            raise ValueError(f"palette must be a list of (R, G, B) colours in 0..255, got shape {colours.shape}")
        ids = class_ids(mask, len(colours) - 1, what="mask")
        return np.ascontiguousarray(colours.astype(np.uint8)[ids].transpose(2, 0, 1))


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


def nearest_colours(painted: np.ndarray, palette: np.ndarray, *, distances: bool = False,
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """The nearest palette colour of each pixel of a painted ``[3, h, w]`` float32 answer: ``(index [h, w]
    int64, the squared distances [L+1, h, w] float32 or None)``.

    The distance of each colour is ``(dr * dr + dg * dg) + db * db`` in float32 and the first of equal
    distances wins: transformers' arithmetic (``pow(pred - palette, 2).sum(-1)``, then ``argmin``), one
    colour at a time, so that no ``[h, w, L+1, 3]`` difference array is made (500 MB for 103 labels at
    448 x 448)."""
    painted = np.asarray(painted, dtype=np.float32)
    palette = np.asarray(palette, dtype=np.float32)
    out = np.empty((len(palette), *painted.shape[1:]), np.float32) if distances else None
    best = index = None
    scratch = np.empty(painted.shape[1:], np.float32)
    for label, colour in enumerate(palette):
        total = out[label] if distances else np.empty(painted.shape[1:], np.float32)
        for channel in range(3):
            np.subtract(painted[channel], colour[channel], out=scratch)
            np.multiply(scratch, scratch, out=scratch)
            if channel == 0:
                total[...] = scratch
            else:
                np.add(total, scratch, out=total)
        if best is None:
            best, index = total.copy(), np.zeros(total.shape, np.int64)
        else:
            closer = total < best
            np.copyto(best, total, where=closer)
            index[closer] = label
    return index, out


def smallest_uint(count: int) -> np.dtype:
    """The smallest unsigned dtype that holds ``0..count - 1``."""
    return np.dtype(np.uint8 if count <= 256 else np.uint16 if count <= 65536 else np.uint32)


def classes_from_painted(painted: np.ndarray, palette: np.ndarray, size: tuple[int, int] | None = None, *,
                         return_scores: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """A painted ``[3, h, w]`` answer (``[0, 255]``) -> int64 class ids of the nearest palette colour, and
    optionally the ``[num_labels + 1, H, W]`` scores (``-squared distance``), at ``size`` (torch nearest).

    The class is decided at the model's resolution and then resized: nearest selection commutes with
    the per-pixel argmin, so this equals transformers, which resizes first.
    """
    index, distance = nearest_colours(painted, palette, distances=return_scores)
    classes = resize_nearest(index[None], size)[0]
    scores = resize_nearest(-distance, size) if return_scores else None
    return classes, scores


# ------------------------------------------------------------------------------------ the processor of a model
def default_processor(config: Any) -> SegGptImageProcessor:
    """transformers' default processing, at the size a model of ``config`` takes."""
    height, width = config.query_size
    return SegGptImageProcessor(size={"height": height, "width": width})


def processor_for(model: Any) -> SegGptImageProcessor:
    """The processor of a model: its own (from its checkpoint), or, for any other object with a
    ``config`` (a model of :mod:`seggpt_jax.nn`, a stand-in), the defaults for that config."""
    own = getattr(model, "processor", None)
    return own if isinstance(own, SegGptImageProcessor) else default_processor(model.config)


def as_processor(source: Any) -> SegGptImageProcessor:
    """A processor from what a data pipeline is given: a processor itself, a model (its own:
    :func:`processor_for`), a config (the defaults at its size) or a ``(height, width)`` size."""
    if isinstance(source, SegGptImageProcessor):
        return source
    if hasattr(source, "config"):
        return processor_for(source)
    if hasattr(source, "query_size"):
        return default_processor(source)
    height, width = (int(v) for v in source)
    return SegGptImageProcessor(size={"height": height, "width": width})
