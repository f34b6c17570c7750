"""Parameter paths: their one dotted spelling (:func:`path_key`), and the stacked layers of a scanned
encoder with the conversions between the stacked layout and the per-layer one.

With ``RuntimeConfig(scan_layers=True)`` the encoder keeps each run of layers it scans
(:func:`seggpt_jax.nn.encoder.layer_segments`) as one *stack*: every parameter of those layers is one
array with a leading layer axis, at ``...encoder.stacks.{first}.{rest}``, keyed by the stack's first
layer; row ``r`` is layer ``first + r``, whose *layer path* is ``...encoder.layers.{first + r}.{rest}``.
ViT-L has the stacks 0 (layers 0-1), 2 (the merge layer alone), 3 (3-5), 6 (6-11), 12 (12-17) and
18 (18-23).

Everything that names a parameter to the outside uses layer paths, whatever the model's layout:
checkpoints (every weight layout), trainable regexes, the layer-wise learning-rate decay, and the
training-state files. So a scanned and an unscanned model write the same files and read each other's.
This module holds the convention and nothing else; it imports nothing of the package.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: The encoder attribute that holds the stacks, and the one that holds unscanned layers.
STACKS, LAYERS = "stacks", "layers"

_STACKED = re.compile(r"(^|\.)encoder\.stacks\.(\d+)\.")


def path_key(path: Iterable[Any]) -> str:
    """The one spelling of a parameter's (or any pytree leaf's) path: dotted, ``model.encoder.layers.0.
    attention.qkv.kernel``, from an NNX path (names and indices) or a ``jax.tree_util`` key path
    (``DictKey``, ``SequenceKey``, ``GetAttrKey``). Checkpoints, optimizer states, trainable patterns
    and exports all key by it."""
    return ".".join(str(getattr(part, "key", getattr(part, "idx", getattr(part, "name", part)))) for part in path)


def stack_start(path: str) -> int | None:
    """The first layer of the stack that a dotted path names, or ``None`` if it names no stack."""
    m = _STACKED.search(path)
    return None if m is None else int(m.group(2))


def layer_paths(path: str, rows: int) -> list[str]:
    """The layer paths of the ``rows`` rows of a stacked path; ``[path]`` for any other path.

    Works anywhere in a longer key (``opt_state.0.mu.model.encoder.stacks.3.mlp.lin1.kernel``)."""
    m = _STACKED.search(path)
    if m is None:
        return [path]
    first = int(m.group(2))
    head, tail = path[:m.start()] + m.group(1), path[m.end():]
    return [f"{head}encoder.{LAYERS}.{first + r}.{tail}" for r in range(rows)]


def row_index(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, int]]:
    """``{layer path: (stacked path, row)}`` for every stacked path among ``shapes`` (path -> shape)."""
    index = {}
    for path, shape in shapes.items():
        if stack_start(path) is not None:
            for row, name in enumerate(layer_paths(path, shape[0])):
                index[name] = (path, row)
    return index


def per_layer(arrays: Mapping[str, Any]) -> dict[str, Any]:
    """``arrays`` (path -> array) with each stacked entry split into its rows, under their layer paths.

    The rows are ``array[r]``: views of a numpy array, copies of a jax array."""
    out = {}
    for path, array in arrays.items():
        if stack_start(path) is None:
            out[path] = array
        else:
            out.update((name, array[r]) for r, name in enumerate(layer_paths(path, array.shape[0])))
    return out


def stacked_like(per_layer_arrays: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                 stack: Callable[[list[Any]], Any]) -> dict[str, Any]:
    """The arrays of a layout given by ``shapes`` (path -> shape, stacked paths included) from per-layer
    arrays: a stacked path gets ``stack`` of its layers' arrays, any other path its own array.

    A ``KeyError`` names the first layer path that ``per_layer_arrays`` lacks."""
    out = {}
    for path, shape in shapes.items():
        if stack_start(path) is None:
            out[path] = per_layer_arrays[path]
        else:
            out[path] = stack([per_layer_arrays[name] for name in layer_paths(path, shape[0])])
    return out


def to_layout(arrays: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
              stack: Callable[[list[Any]], Any]) -> dict[str, Any]:
    """``arrays`` of one layout (stacked or not) in the layout of ``shapes``; entries already in that
    layout are passed through untouched (not copied)."""
    if all(path in arrays for path in shapes):
        return {path: arrays[path] for path in shapes}
    return stacked_like(per_layer(arrays), shapes, stack)


__all__ = ["LAYERS", "STACKS", "layer_paths", "path_key", "per_layer", "row_index", "stack_start", "stacked_like",
           "to_layout"]
