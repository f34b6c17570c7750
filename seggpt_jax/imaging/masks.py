"""What a mask means: the one rule for prompt masks, dataset masks, and the class palette.

SegGPT sees a mask as an RGB picture. Every reader of masks in seggpt-jax (the processor, the
:class:`~seggpt_jax.Segmenter`, the datasets, the command line) goes through this module.

**Binary mode** (no ``num_labels``): a prompt mask is fed with its own levels, as the BAAI code
(``Image.open(mask).convert("RGB")``) and transformers' processor with ``do_convert_rgb=False`` do:
RGB as given (anti-aliased grey edges included), greyscale repeated, palette images through their
palette, 16-bit scaled to 8 bits. Masks that hold only 0 and 1 (bool arrays, 0/1 label PNGs) are
scaled to 0/255; fed as they are they would be black. A mask whose shape is only in its alpha channel
(one flat colour everywhere, as many editors export a shape on a transparent background) is read from
its alpha channel: read as RGB it would be one flat colour. See :func:`binary_picture`.

**Prompts that would be misread** get a :class:`MaskWarning` (:func:`prompt_picture`): an empty
prompt mask, one that covers the whole image, and, in binary mode, masks that look like class ids
(nearly black levels, or a palette image of several indices), which need ``num_labels``.

**Semantic mode** (``num_labels=N``): a mask holds class ids ``0..N`` (0 = background) and is painted
with the SegGPT palette (:func:`build_palette`). Accepted (see :func:`class_ids`):

* class-id maps: one channel (``L``, 16-bit, integer arrays), palette PNGs (the index is the class,
  as PASCAL VOC ships them), or grey RGB with ``R = G = B``;
* RGB masks whose colours are all in the model's palette;
* any other colours only through an explicit :class:`ColourMap` (``colour_map=`` in the API,
  ``--colour-map`` on the command line; ``"voc"`` is the PASCAL VOC colour table). Unknown colours
  are an error naming the first of them, never a silent guess.

**Foreground** of a binary mask (:func:`foreground`): pixels at least half as bright as the mask's
brightest pixel (brightness = the largest channel). So 0/1, 0/255, 16-bit, anti-aliased and coloured
masks all read as the shape they draw. It is the one reading of a mask as a shape: dataset targets,
the metrics, and the prompt warnings (a prompt is "empty" or "the whole image" by it) use it; the
model itself is fed the prompt's picture, as above. HSNet's FSS-1000 protocol keeps HSNet's own rule
(grey >= 128) for comparable numbers. A painted answer is read by one rule too, the nearest of black
and white (:func:`seggpt_jax.inference.results.result_from_painted`), in inference and in the metrics.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from .decode import InputError, describe, open_image, to_numpy, to_rgb_uint8

Colour = tuple[int, int, int]

#: PIL modes whose pixels are colours (everything else is one channel of levels or indices).
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_MAX_LISTED = 5


class MaskWarning(UserWarning):
    """A prompt mask that will probably not do what its author meant (empty, everything, class ids in
    binary mode)."""


class LabelError(InputError):
    """Class ids outside ``0..num_labels``; ``found`` lists the first of them."""

    def __init__(self, message: str, found: list[int]):
        super().__init__(message)
        self.found = found


def build_palette(num_labels: int) -> list[Colour]:
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


def labels_to_rgb(labels: np.ndarray, num_labels: int | None, *, what: str = "mask") -> np.ndarray:
    """``[H, W]`` class ids -> ``[H, W, 3]`` uint8: palette colours, or (without ``num_labels``) the id
    repeated as a grey level, as transformers' ``mask_to_rgb``."""
    if num_labels is None:
        _check_grey_levels(labels, what)
        return np.repeat(labels.astype(np.uint8)[..., None], 3, axis=-1)
    check_class_ids(labels, num_labels, what=what)
    return np.asarray(build_palette(num_labels), dtype=np.uint8)[labels]


def check_class_ids(labels: np.ndarray, num_labels: int, *, what: str, ignore_index: int | None = None) -> None:
    """Raise if any id (other than ``ignore_index``) is outside ``0..num_labels``."""
    values = labels[labels != ignore_index] if ignore_index is not None else labels
    if not values.size:
        return
    if values.min() < 0:
        raise InputError(f"{what} has negative labels (min {values.min()})")
    if values.max() > num_labels:
        found = [int(v) for v in np.unique(values[values > num_labels])[:_MAX_LISTED]]
        hint = (" (255 is PASCAL VOC's 'void' border: map it to background first, or read the colours with "
                "colour_map='voc')" if 255 in found else "")
        raise LabelError(f"{what} has labels {found} above num_labels={num_labels} (class ids must be "
                         f"0..{num_labels}, 0 = background){hint}", found)


def _check_grey_levels(labels: np.ndarray, what: str) -> None:
    if labels.size and labels.min() < 0:
        raise InputError(f"{what} has negative labels (min {labels.min()})")
    if labels.size and labels.max() > 255:
        raise InputError(f"{what} has labels up to {labels.max()}; without num_labels they are used as grey levels "
                         f"and must be <= 255 (pass num_labels to use the class palette)")


# ------------------------------------------------------------------------------------ colour maps
def voc_colours(count: int = 256) -> list[Colour]:
    """The PASCAL VOC colour table: class ``i`` gets the bits of ``i`` spread over R, G, B from the top bit."""
    colours = []
    for index in range(count):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours.append((r, g, b))
    return colours


_COLOUR_TEXT = re.compile(r"^\s*(?:#(?P<hex>[0-9a-fA-F]{6})|\(?\s*(?P<r>\d+)\s*,\s*(?P<g>\d+)\s*,\s*(?P<b>\d+)\s*\)?)\s*$")


def parse_colour(value: Any) -> Colour:
    """``(r, g, b)``, ``"r,g,b"`` or ``"#rrggbb"`` -> a colour tuple."""
    if isinstance(value, str):
        match = _COLOUR_TEXT.match(value)
        if not match:
            raise ValueError(f"cannot read colour {value!r}; write it as 'R,G,B' or '#RRGGBB'")
        if match["hex"]:
            value = tuple(int(match["hex"][i:i + 2], 16) for i in (0, 2, 4))
        else:
            value = (int(match["r"]), int(match["g"]), int(match["b"]))
    try:
        colour = tuple(int(c) for c in value)
    except (TypeError, ValueError):
        raise ValueError(f"a colour is three integers 0..255, got {value!r}") from None
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise ValueError(f"a colour is three integers 0..255, got {value!r}")
    return colour  # type: ignore[return-value]


class ColourMap:
    """An explicit colour -> class id mapping for RGB masks in another palette (e.g. PASCAL VOC).

    Build it from a mapping (``{(192, 128, 128): 1, "#800000": 2}``), or with :meth:`parse` from
    ``"voc"`` (the PASCAL VOC colour table: the colour of VOC class ``i`` is class ``i``, the void
    border colour (224, 224, 192) is background) or a JSON file ``{"R,G,B": id, ...}``.
    """

    def __init__(self, colours: Mapping[Any, int], *, name: str = "the colour map"):
        table: dict[Colour, int] = {}
        for key, label in colours.items():
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
                raise ValueError(f"{name}: class id for colour {key!r} must be a non-negative integer, got {label!r}")
            table[parse_colour(key)] = int(label)
        if not table:
            raise ValueError(f"{name} is empty")
        self.colours, self.name = table, name

    @classmethod
    def parse(cls, spec: "ColourMap | Mapping | str | os.PathLike") -> "ColourMap":
        if isinstance(spec, ColourMap):
            return spec
        if isinstance(spec, Mapping):
            return cls(spec)
        text = os.fspath(spec)
        if text.lower() == "voc":
            table = {colour: index for index, colour in enumerate(voc_colours(21))}
            table[(224, 224, 192)] = 0  # the void border
            return cls(table, name="the PASCAL VOC colour table")
        if not os.path.isfile(text):
            raise ValueError(f"colour map {text!r} is neither 'voc' nor a JSON file")
        try:
            with open(text, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read colour map {text}: {e}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"colour map {text} must be a JSON object {{\"R,G,B\": class id, ...}}")
        return cls(data, name=f"colour map {text}")

    def lookup(self, rgb: np.ndarray, *, what: str) -> np.ndarray:
        """``[H, W, 3]`` uint8 -> ``[H, W]`` int64 ids; unknown colours raise, naming them."""
        packed, inverse = _unique_colours(rgb)
        known = np.array([self.colours.get(_unpack(p), -1) for p in packed], dtype=np.int64)
        if np.any(known < 0):
            unknown = packed[known < 0]
            counts = np.bincount(inverse.ravel(), minlength=len(packed))[known < 0]
            raise InputError(f"{what} has colours that {self.name} does not list: {_list_colours(unknown, counts)}")
        return known[inverse]


def _unique_colours(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2].astype(np.int32)
    values, inverse = np.unique(packed, return_inverse=True)
    return values, inverse.reshape(packed.shape)


def _unpack(packed: int) -> Colour:
    packed = int(packed)
    return (packed >> 16) & 255, (packed >> 8) & 255, packed & 255


def _list_colours(packed: np.ndarray, counts: np.ndarray) -> str:
    order = np.argsort(-counts, kind="stable")[:_MAX_LISTED]
    shown = ", ".join(f"{_unpack(packed[i])} ({counts[i]} px)" for i in order)
    more = f" and {len(packed) - len(order)} more" if len(packed) > len(order) else ""
    return shown + more


# ------------------------------------------------------------------------------------ reading
def _mask_name(mask: Any, what: str) -> str:
    """``what`` plus the mask's path or kind and shape (once)."""
    described = describe(mask)
    return what if described in what else f"{what} ({described})"


def _open(mask: Any) -> Any:
    return open_image(mask) if isinstance(mask, (str, os.PathLike)) else mask


def alpha_only(mask: Any) -> np.ndarray | None:
    """The alpha channel (``[H, W]`` uint8) of a mask whose shape is only there: its colour is one flat
    colour everywhere and its alpha is not. ``None`` for every other mask."""
    if isinstance(mask, Image.Image):
        has_alpha = mask.mode in ("RGBA", "LA", "PA", "RGBa", "La") or \
            (mask.mode == "P" and "transparency" in mask.info)
        if not has_alpha:
            return None
        rgba = np.asarray(mask.convert("RGBA"))
        colour, alpha = rgba[..., :3], rgba[..., 3]
    else:
        array = to_numpy(mask)
        if array.ndim != 3 or array.dtype != np.uint8:
            return None
        if array.shape[-1] not in (2, 4) and array.shape[0] in (2, 4):
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] not in (2, 4):
            return None
        colour, alpha = array[..., :-1], array[..., -1]
    if not alpha.size or alpha.min() == alpha.max():
        return None
    flat = colour.reshape(-1, colour.shape[-1])
    if np.any(flat != flat[0]):
        return None
    return np.ascontiguousarray(alpha)


def binary_picture(mask: Any, *, what: str = "prompt mask") -> np.ndarray:
    """The prompt picture in binary mode: the mask's own levels as ``[H, W, 3]`` uint8 (see module doc)."""
    mask = _open(mask)
    alpha = alpha_only(mask)
    if alpha is not None:
        rgb = np.repeat(alpha[..., None], 3, axis=-1)
    else:
        if not isinstance(mask, Image.Image):
            array = to_numpy(mask)
            if np.issubdtype(array.dtype, np.signedinteger) or array.dtype in (np.uint32, np.uint64):
                _check_grey_levels(array, _mask_name(mask, what))  # label values, not 16-bit data (that is uint16)
        rgb = to_rgb_uint8(mask, what=what)  # errors name the file, or the array's kind and shape
    if rgb.size and rgb.max() == 1:  # a 0/1 mask: black as it is
        rgb = rgb * np.uint8(255)
    return rgb


def transformers_picture(mask: Any, *, what: str = "prompt mask") -> np.ndarray:
    """A binary-mode prompt mask read exactly as transformers' ``SegGptImageProcessor`` reads it
    (``do_convert_rgb=True``, no ``num_labels``): one-channel levels repeated as they are (0/1 and bool
    masks stay 0/1: black), palette images by their indices (not their colours). This is what
    :class:`~seggpt_jax.SegGptImageProcessor` does; the :class:`~seggpt_jax.Segmenter`, the command line
    and the server read masks by the friendlier rule of :func:`binary_picture`. RGB masks, which
    transformers misreads (as a batch of rows), are taken as given."""
    mask = _open(mask)
    if isinstance(mask, Image.Image):
        if mask.mode in ("P", "PA"):
            levels = np.asarray(mask.convert("P") if mask.mode == "PA" else mask)
            return np.repeat(levels[..., None], 3, axis=-1)
        if mask.mode == "1":
            return np.repeat(np.asarray(mask).astype(np.uint8)[..., None], 3, axis=-1)
        return to_rgb_uint8(mask, what=what)
    array = to_numpy(mask)
    if array.dtype == bool:
        array = array.astype(np.uint8)  # True is level 1, as transformers feeds it
    elif np.issubdtype(array.dtype, np.signedinteger) or array.dtype in (np.uint32, np.uint64):
        _check_grey_levels(array, _mask_name(mask, what))
    return to_rgb_uint8(array, what=what)


def class_ids(mask: Any, num_labels: int, *, colour_map: ColourMap | Mapping | str | None = None,
              ignore_index: int | None = None, what: str = "prompt mask") -> np.ndarray:
    """A semantic mask -> ``[H, W]`` int64 class ids ``0..num_labels`` (see module doc).

    ``ignore_index`` (datasets) is let through the range check: it marks pixels to skip.
    """
    name = _mask_name(mask, what)
    mask = _open(mask)
    colour_map = ColourMap.parse(colour_map) if colour_map is not None else None
    if alpha_only(mask) is not None:
        raise InputError(f"{name} holds its shape only in its alpha channel (its colour is one flat colour); a "
                         f"semantic mask holds class ids or palette colours: save the classes as colours or ids")
    if isinstance(mask, Image.Image):
        if colour_map is not None or mask.mode in _COLOUR_MODES:
            ids = _ids_from_colours(np.asarray(mask.convert("RGB")), num_labels, colour_map, name)
        elif mask.mode in ("P", "PA"):
            ids = np.asarray(mask.convert("P") if mask.mode == "PA" else mask).astype(np.int64)  # indices
        elif mask.mode == "LA":
            ids = np.asarray(mask.getchannel(0)).astype(np.int64)
        else:  # L, 1, I;16, I, F
            ids = _integer_ids(np.asarray(mask), name)
    else:
        array = to_numpy(mask)
        if array.ndim == 3 and array.shape[-1] == 1:  # [H, W, 1]
            array = array[..., 0]
        elif array.ndim == 3 and array.shape[0] == 1:  # [1, H, W]
            array = array[0]
        if array.ndim == 2:
            ids = _integer_ids(array, name)
        elif array.ndim == 3:
            ids = _ids_from_colours(to_rgb_uint8(array, what=what), num_labels, colour_map, name)
        else:
            raise InputError(f"{name} must be a 2-D class-id map or an RGB mask, got shape {array.shape}")
    check_class_ids(ids, num_labels, what=name, ignore_index=ignore_index)
    return ids


def _integer_ids(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(f"{name} has non-integer values; a class-id map holds class ids 0..num_labels")
    elif not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name} has unsupported dtype {array.dtype}")
    return array.astype(np.int64)


def _ids_from_colours(rgb: np.ndarray, num_labels: int, colour_map: ColourMap | None, name: str) -> np.ndarray:
    if colour_map is not None:
        return colour_map.lookup(rgb, what=name)
    palette = {colour: index for index, colour in enumerate(build_palette(num_labels))}
    packed, inverse = _unique_colours(rgb)
    colours = [_unpack(p) for p in packed]
    if all(c in palette for c in colours):
        return np.array([palette[c] for c in colours], dtype=np.int64)[inverse]
    if all(c[0] == c[1] == c[2] for c in colours):  # a class-id map saved as grey RGB
        return rgb[..., 0].astype(np.int64)
    unknown = np.array([not (c in palette or c[0] == c[1] == c[2]) for c in colours])
    counts = np.bincount(inverse.ravel(), minlength=len(packed))
    raise InputError(
        f"{name} has colours that are neither class ids (grey, R=G=B) nor in the {num_labels}-label palette: "
        f"{_list_colours(packed[unknown], counts[unknown])}; say which class each colour is with "
        f"colour_map={{(R, G, B): class_id, ...}} (command line: --colour-map FILE.json, or --colour-map voc for "
        f"PASCAL VOC colours)")


def semantic_picture(mask: Any, num_labels: int, *, colour_map: ColourMap | Mapping | str | None = None,
                     what: str = "prompt mask") -> np.ndarray:
    """The prompt picture in semantic mode: palette colours of the mask's class ids."""
    return labels_to_rgb(class_ids(mask, num_labels, colour_map=colour_map, what=what), num_labels, what=what)


def prompt_picture(mask: Any, num_labels: int | None = None, *, colour_map: ColourMap | Mapping | str | None = None,
                   what: str = "prompt mask", warn: bool = True, transformers: bool = False) -> np.ndarray:
    """What the model sees for a prompt mask: :func:`binary_picture` without ``num_labels`` (or, with
    ``transformers=True``, :func:`transformers_picture`: the processor's reading), else the palette
    colours of its class ids. With ``warn``, a mask that would probably be misread gets a
    :class:`MaskWarning` (see the module doc)."""
    name = _mask_name(mask, what)
    mask = _open(mask)
    if num_labels is None:
        if colour_map is not None:
            raise ValueError("colour_map needs num_labels: it maps colours to class ids (semantic mode)")
        picture = transformers_picture(mask, what=what) if transformers else binary_picture(mask, what=what)
        if warn:
            for message in binary_prompt_problems(mask, picture):
                _warn(f"{name} {message}")
        return picture
    ids = class_ids(mask, num_labels, colour_map=colour_map, what=what)
    if warn and ids.size and ids.min() == ids.max():
        problem = "is empty (all background)" if ids.flat[0] == 0 else \
            f"is class {ids.flat[0]} everywhere: the prompt shows no boundary to learn from"
        _warn(f"{name} {problem}")
    return labels_to_rgb(ids, num_labels, what=what)


def _warn(message: str) -> None:
    """A :class:`MaskWarning`, attributed to this module: Python's default filter shows each message once."""
    warnings.warn(message, MaskWarning, stacklevel=1)


#: Binary prompt masks whose brightest level is below this are "nearly black" (see :func:`binary_prompt_problems`).
DARK_LEVEL = 64
_NUM_LABELS_HINT = "if its values are class ids, pass num_labels (--num-labels on the command line)"


def binary_prompt_problems(mask: Any, picture: np.ndarray) -> list[str]:
    """Why a binary prompt mask would probably be misread, as phrases that follow its name (none: [])."""
    if not picture.size:
        return []
    top = int(picture.max())
    marked = _foreground_of_picture(picture)  # what the datasets and the metrics would read as its shape
    if not marked.any():
        return ["is empty (all black): the prompt marks nothing to segment"]
    if marked.all():
        flat = picture.reshape(-1, 3)
        level = f"one flat level ({top})" if np.all(flat == flat[0]) else "foreground"
        return [f"is {level} everywhere: the prompt marks the whole image"]
    if isinstance(mask, Image.Image) and mask.mode in ("P", "PA") and alpha_only(mask) is None:
        used = np.unique(np.asarray(mask.convert("P") if mask.mode == "PA" else mask))
        if len(used) > 2:
            shown = ", ".join(str(int(i)) for i in used[:_MAX_LISTED]) + (" ..." if len(used) > _MAX_LISTED else "")
            return [f"is a palette image of {len(used)} indices ({shown}); binary mode feeds its colours as they "
                    f"are; {_NUM_LABELS_HINT}"]
    if top < DARK_LEVEL:
        return [f"is nearly black (its brightest level is {top} of 255), so binary mode reads it as background; "
                f"{_NUM_LABELS_HINT}"]
    return []


def foreground(mask: Any, *, what: str = "mask") -> np.ndarray:
    """A binary mask's foreground: ``[H, W]`` bool, pixels at least half as bright as the brightest.

    The one reading of a binary mask as a shape: dataset and benchmark targets (bar HSNet's own rule
    for FSS-1000), the metrics, and the prompt warnings (:func:`binary_prompt_problems`: empty, or
    everything) all use it."""
    return _foreground_of_picture(binary_picture(mask, what=what))


def _foreground_of_picture(picture: np.ndarray) -> np.ndarray:
    brightness = picture.max(axis=-1)
    top = int(brightness.max(initial=0))
    if top == 0:
        return np.zeros(brightness.shape, dtype=bool)
    return brightness.astype(np.int32) * 2 >= top
