"""One loader for every source format: build the model abstractly, fill it tensor by tensor.

The model is first built with ``nnx.eval_shape`` (no memory), then each source tensor is matched by
the format's table, its shape checked *before* its data is read, converted to our layout and dtype,
and placed. Every source tensor must be used and every parameter filled; all problems are collected
and raised together in one :class:`CheckpointError` that names the keys.

:func:`save_pretrained` runs the same tables backwards and writes our layout, transformers' or the
original BAAI one, streaming one tensor at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..files import atomic_save
from ..config import ConfigError, SegGptConfig
from .. import hub
from ..version import __version__
from .readers import CheckpointError, TensorReader, open_weights
from .tables import IDENTITY, NATIVE, NATIVE_METADATA_KEY, TABLES, TRANSFORMERS, Table, Transform, detect_format

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
#: ``save_pretrained(layout="original")``'s file: the BAAI release's name, as safetensors.
ORIGINAL_WEIGHTS_NAME = "seggpt_vit_large.safetensors"
LAYOUT_VERSION = "1"
_MAX_LISTED = 40


def path_key(path: tuple) -> str:
    """The one spelling of a parameter's (or any pytree leaf's) path: dotted, ``model.encoder.layers.0.
    attention.qkv.kernel``, from an NNX path (names and indices) or a ``jax.tree_util`` key path
    (``DictKey``, ``SequenceKey``, ``GetAttrKey``). Checkpoints, optimizer states, trainable patterns
    and exports all key by it."""
    return ".".join(str(getattr(part, "key", getattr(part, "idx", getattr(part, "name", part)))) for part in path)


def flat_parameters(model: nnx.Module) -> dict[str, Any]:
    """``{"model.encoder.layers.0.attention.qkv.kernel": value, ...}`` for a model or its abstract twin."""
    _, state = nnx.split(model)
    return {path_key(path): var for path, var in nnx.to_flat_state(state)}


def _path_prefix(cls: type) -> str:
    """Our tables target ``SegGptForImageSegmentation`` paths; the encoder alone lives under ``model.``."""
    return getattr(cls, "_checkpoint_prefix", "")


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in shown) + more


def fill_parameters(reader: TensorReader, table: Table, abstract: dict[str, Any], *, prefix: str,
                    param_dtype: Any, model_name: str) -> dict[str, jax.Array]:
    """Map every tensor of ``reader`` onto ``abstract`` (path -> abstract Variable); raise on any problem."""
    filled: dict[str, jax.Array] = {}
    origin: dict[str, str] = {}
    unexpected, mismatched, duplicated, bad_values, skipped = [], [], [], [], []
    for key in reader.keys():
        hit = table.match(key)
        if hit is None:
            unexpected.append(key)
            continue
        target, transform = hit
        if prefix:
            if not target.startswith(prefix):
                skipped.append(key)  # e.g. the decoder when loading the encoder alone
                continue
            target = target[len(prefix):]
        if target not in abstract:
            unexpected.append(f"{key} (-> {target}: no such parameter in this model)")
            continue
        if target in origin:
            duplicated.append(f"{key} and {origin[target]} both map to {target}")
            continue
        origin[target] = key
        expected = tuple(abstract[target].shape)
        source_shape = reader.shape(key)
        ours = transform.shape(source_shape)
        if ours != expected:
            ours_note = f" ({target} {expected} after the {transform.name} transpose)" if transform.perm else ""
            mismatched.append(f"{key}: checkpoint has {source_shape}, model expects "
                              f"{transform.source_shape(expected)}{ours_note}")
            continue
        array = reader.get(key)
        if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
            bad_values.append(f"{key}: dtype {array.dtype} is not floating point")
            continue
        if not np.all(np.isfinite(array.astype(np.float32) if array.dtype.name == "bfloat16" else array)):
            bad_values.append(f"{key}: contains NaN or infinite values (corrupt checkpoint?)")
            continue
        filled[target] = jnp.asarray(transform.apply(array), dtype=param_dtype)
        del array
    missing = sorted(set(abstract) - set(filled) - {t for t in origin if t not in filled})
    problems = []
    if missing:
        problems.append(_listing("parameters missing from the checkpoint", missing))
    if unexpected:
        problems.append(_listing("checkpoint tensors this model does not use", unexpected))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if duplicated:
        problems.append(_listing("tensors mapped twice", duplicated))
    if bad_values:
        problems.append(_listing("unusable values", bad_values))
    if problems:
        raise CheckpointError(f"{reader.description} ({table.name} layout) does not fit {model_name}:\n"
                              + "\n".join(problems))
    if skipped:
        logger.info("%s: %d tensors not used by %s (e.g. %s)", reader.description, len(skipped), model_name, skipped[0])
    return filled


def _config_for(resolved: hub.Resolved, reader: TensorReader,
                explicit: SegGptConfig | None) -> tuple[SegGptConfig, str]:
    """The config to build the model with, and where it came from (for messages)."""
    if explicit is not None:
        if not isinstance(explicit, SegGptConfig):
            raise TypeError(f"config must be a SegGptConfig, got {type(explicit).__name__}")
        return explicit, "the config= argument"
    if resolved.config_file is not None:
        return SegGptConfig.from_json_file(resolved.config_file), resolved.config_file
    embedded = reader.metadata.get("config")
    if embedded:
        source = f"the config in {resolved.weights}'s metadata"
        try:
            return SegGptConfig.from_dict(json.loads(embedded), source=source), source
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{resolved.weights}: config in metadata is not valid JSON: {e}") from None
    logger.info("%s has no config.json: assuming the ViT-L config of the released checkpoint", resolved.weights)
    return SegGptConfig.vit_large(), "the default ViT-L config (no config.json found; pass config=...)"


def load_pretrained(cls: type, name_or_path: str | os.PathLike, *, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                    token: str | bool | None = None, config: SegGptConfig | None = None,
                    dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, precision: Any = None,
                    runtime: Any = None, layout: str | None = None, model_kwargs: dict[str, Any] | None = None):
    """See :meth:`seggpt_jax.SegGptForImageSegmentation.from_pretrained` (``cls`` is built with
    ``model_kwargs`` besides the config and settings)."""
    resolved = hub.resolve(name_or_path, revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only, token=token)
    with open_weights(resolved.weights) as reader:
        try:
            cfg, cfg_source = _config_for(resolved, reader, config)
        except ConfigError as e:  # its message names the config file
            raise CheckpointError(str(e)) from None
        keys = reader.keys()
        if layout is not None:
            if layout not in TABLES:
                raise ValueError(f"layout must be one of {sorted(TABLES)}, got {layout!r}")
            table = TABLES[layout]
        else:
            table = detect_format(keys, reader.metadata)
            if table is None:
                raise CheckpointError(f"{resolved.weights}: cannot tell the checkpoint layout from its keys "
                                      f"(first keys: {keys[:8]}); expected transformers, original BAAI or "
                                      f"seggpt-jax names")
        abstract_model = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                                    runtime=runtime, rngs=nnx.Rngs(0), **(model_kwargs or {})))
        graphdef, abstract_state = nnx.split(abstract_model)
        flat_abstract = nnx.to_flat_state(abstract_state)
        abstract = {path_key(path): var for path, var in flat_abstract}
        filled = fill_parameters(reader, table, abstract, prefix=_path_prefix(cls), param_dtype=jnp.dtype(param_dtype),
                                 model_name=f"{cls.__name__} built from {cfg_source}")
    leaves = [(path, var.replace(filled[path_key(path)])) for path, var in flat_abstract]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def save_pretrained(model: nnx.Module, directory: str | os.PathLike, layout: str = "seggpt-jax") -> None:
    """Write ``model`` into ``directory`` in one layout; each file atomically, other files left alone.

    * ``"seggpt-jax"``: ``config.json`` + ``model.safetensors`` keyed by our parameter paths, the
      config also in the file's metadata; loads back bit-identical.
    * ``"transformers"``: ``config.json`` with transformers' keys + ``model.safetensors`` with
      transformers' names and PyTorch layouts (metadata ``{"format": "pt"}``), in the parameters'
      dtype: ``transformers.SegGptForImageSegmentation.from_pretrained(directory)`` (``SegGptModel``
      for the encoder alone) loads it. torch is not needed.
    * ``"original"``: ``seggpt_vit_large.safetensors`` with the BAAI names and PyTorch layouts, the
      config in its metadata (the BAAI release has no config file); :meth:`from_pretrained` reads
      the folder or the file. safetensors rather than BAAI's ``.pth`` pickle, so that no torch is
      needed and the same streaming writer serves; BAAI's code (which builds ViT-L only) takes it as
      ``torch.save({"model": safetensors.torch.load_file(path)}, "seggpt_vit_large.pth")``.

    Every key comes from the model's own parameters through the layout's table run backwards
    (:meth:`~seggpt_jax.weights.tables.Table.source_for`), never from a transformers model.
    Tensors are brought to the host, transposed and written one at a time (:func:`write_safetensors`),
    so saving needs at most the largest tensor beyond the model itself (``python -m
    benchmarks.weights_memory`` measures it, ``benchmarks/RESULTS.md``).
    """
    if layout not in TABLES:
        raise ValueError(f"layout must be one of {sorted(TABLES)}, got {layout!r}")
    table = TABLES[layout]
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"save_pretrained needs a directory, but {directory} is a file")
    config: SegGptConfig = model.config
    prefix = _path_prefix(type(model))
    tensors: dict[str, tuple[jax.Array, Transform]] = {}
    unnamed = []
    for path, var in flat_parameters(model).items():
        hit = table.source_for(prefix + path, optional=not prefix)  # the encoder alone: no ``model.`` prefix
        if hit is None:
            unnamed.append(path)
            continue
        key, transform = hit
        if key in tensors:
            raise CheckpointError(f"{layout} layout: two parameters of {type(model).__name__} map to {key}")
        tensors[key] = (var[...], transform)
    if unnamed:
        raise CheckpointError(f"the {layout} layout has no name for {len(unnamed)} parameters of "
                              f"{type(model).__name__}: {unnamed[:8]}")
    dtypes = sorted({jnp.dtype(array.dtype).name for array, _ in tensors.values()})
    architecture = type(model).__name__  # our class names are transformers' own
    os.makedirs(directory, exist_ok=True)
    if table is NATIVE:
        metadata = {"format": "np", NATIVE_METADATA_KEY: LAYOUT_VERSION, "model_class": architecture,
                    "config": json.dumps(config.to_dict(), sort_keys=True)}
        files = {WEIGHTS_NAME: metadata}
        extra = {"architectures": [architecture], "seggpt_jax_version": __version__}
    elif table is TRANSFORMERS:
        files = {WEIGHTS_NAME: {"format": "pt"}}
        extra = {"architectures": [architecture], **({"dtype": dtypes[0]} if len(dtypes) == 1 else {})}
    else:
        files = {ORIGINAL_WEIGHTS_NAME: {"format": "pt", "config": json.dumps(config.to_dict(), sort_keys=True)}}
        extra = None  # the BAAI layout has no config.json
    for name, metadata in files.items():
        atomic_save(os.path.join(directory, name), lambda tmp: write_safetensors(tmp, tensors, metadata))
    if extra is not None:
        config.to_json_file(os.path.join(directory, hub.CONFIG_NAME), **extra)
    others = sorted(set(os.listdir(directory)) & (set(hub.WEIGHT_NAMES) | set(hub.ORIGINAL_NAMES)) - set(files))
    if others:
        logger.warning("%s also holds %s from an earlier save; from_pretrained(folder) picks files in the order "
                       "%s, so load the file itself or save each layout to its own folder", directory, others,
                       list(hub.WEIGHT_NAMES))


# safetensors dtype codes of the dtypes we write (parameters, and optimizer states' counters).
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
                       "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """The one safetensors writer of the package: the format (8-byte little-endian header size, JSON header
    padded to 8 bytes, raw little-endian data), each tensor brought to the host, put in its file layout
    and written in turn, so that writing holds one tensor beyond the arrays themselves. ``tensors`` maps
    each key to an array, or to ``(array, transform)`` (:class:`~seggpt_jax.weights.tables.Transform`,
    from our layout to the file's)."""
    tensors = {key: value if isinstance(value, tuple) else (value, IDENTITY) for key, value in tensors.items()}
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, (array, transform) in tensors.items():
        dtype = np.dtype(array.dtype)
        if dtype.name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{key}: cannot save parameters of dtype {dtype.name}")
        shape = transform.source_shape(array.shape)
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    host = jax.devices("cpu")[0]
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for array, transform in tensors.values():
            # device_put to the host: a copy of this one tensor from an accelerator, none for a CPU array.
            host_array = array if isinstance(array, np.ndarray) else np.asarray(jax.device_put(array, host))
            data = np.ascontiguousarray(transform.invert(host_array))
            f.write(data.reshape(-1).view(np.uint8))


__all__ = ["CheckpointError", "fill_parameters", "flat_parameters", "load_pretrained", "path_key", "save_pretrained",
           "write_safetensors"]
