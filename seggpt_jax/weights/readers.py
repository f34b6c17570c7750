"""Lazy tensor readers: key listing and shapes without reading data, then one tensor at a time.

Reading one tensor at a time (safetensors with positioned reads; torch pickles are loaded with
``mmap=True``) keeps host memory near one copy of the weights plus the largest tensor while a model is
filled. :func:`read_safetensors` is the one way to read a whole safetensors file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
import zipfile
from typing import Any

import numpy as np

from ..hub import CheckpointError  # noqa: F401 (re-exported: defined at the bottom layer)


class TensorReader:
    """Interface: ``keys()``, ``shape(key)``, ``get(key) -> np.ndarray``, ``close()``, ``metadata``."""

    description: str
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SafetensorsReader(TensorReader):
    """safetensors through the library's own reader, ``safe_open(path, "numpy", backend="pread")``.

    ``pread`` (safetensors >= 0.8) reads each tensor into its own array instead of memory-mapping the
    file, so the file's pages are not mapped into the process while a model is filled: a load holds
    one copy of the weights (``python -m benchmarks.weights_memory`` compares the readers,
    ``benchmarks/RESULTS.md``).
    """

    def __init__(self, path: str):
        from safetensors import SafetensorError, safe_open

        self.description = path
        _check_file(path)
        try:
            self._file = safe_open(path, "numpy", backend="pread")
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        self.metadata = dict(self._file.metadata() or {})
        self._keys = list(self._file.keys())

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        try:
            return self._file.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - SafetensorError, or numpy lacking the dtype (F8 ...)
            dtype = self._file.get_slice(key).get_dtype()
            raise CheckpointError(f"{self.description}: cannot read tensor {key!r} ({dtype}): {e}") from None

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.__exit__(None, None, None)
            self._file = None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file as numpy arrays, and its metadata; errors name the file."""
    with SafetensorsReader(os.fspath(path)) as reader:
        return {key: reader.get(key) for key in reader.keys()}, dict(reader.metadata)


class TorchReader(TensorReader):
    """``torch.load(weights_only=True)`` of a state dict (``pytorch_model.bin``, BAAI ``.pth``).

    The BAAI checkpoint keeps its state dict under ``"model"``; ``"state_dict"`` and a bare
    state dict are accepted too, and a DDP ``module.`` prefix is removed.
    """

    def __init__(self, path: str):
        self.description = path
        self.metadata = {}
        _check_file(path)
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{path} is a PyTorch pickle; reading it needs torch: pip install 'seggpt-jax[convert]' "
                "(or convert it once elsewhere with `seggpt-jax convert` and load the safetensors result)"
            ) from None
        self._torch = torch
        try:
            # argparse.Namespace (training arguments saved beside the weights) only holds attributes
            with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it all
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/UnpicklingError/EOFError/KeyError...
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {_torch_load_reason(e)}") from None
        state = obj
        if isinstance(obj, dict):
            for wrapper in ("model", "state_dict", "model_state_dict"):
                if wrapper in obj and isinstance(obj[wrapper], dict):
                    state = obj[wrapper]
                    break
        if not isinstance(state, dict) or not state:
            raise CheckpointError(f"{path}: expected a state dict of tensors (optionally under 'model'), "
                                  f"found {type(state).__name__}")
        tensors = {}
        for key, value in state.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{path}: state dict key {key!r} is not a string")
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
            tensors[key[len("module."):] if key.startswith("module.") else key] = value
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> np.ndarray:
        tensor = self._tensors[key].detach()
        try:
            if tensor.dtype == self._torch.bfloat16:
                import ml_dtypes

                return tensor.contiguous().view(self._torch.uint16).numpy().view(ml_dtypes.bfloat16)
            return tensor.contiguous().numpy()
        except Exception as e:  # noqa: BLE001 - e.g. storage past the end of a truncated mmap
            raise CheckpointError(f"{self.description}: cannot read tensor {key!r}: {e}") from None

    def close(self) -> None:
        self._tensors = {}


def _torch_load_reason(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in our words: torch's own message suggests loading
    with ``weights_only=False``, which runs arbitrary code from the file, so it is never passed on."""
    text = str(error)
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsupported:
        return (f"it holds a Python object ({unsupported.group(1)}) besides tensors; only tensors are read, "
                f"because unpickling objects can run code from the file")
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds data other than a state dict of tensors, or it is truncated or corrupt"
    first = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0] if text.strip() else type(error).__name__
    return f"truncated or corrupt? ({first.rstrip('.')})"


class ShardedReader(TensorReader):
    """A ``*.index.json`` ``weight_map`` over several shards, each read lazily."""

    def __init__(self, index_path: str, open_shard):
        self.description = index_path
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("weight_map is empty")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid sharded-checkpoint index: {e}") from None
        self.metadata = dict(index.get("metadata") or {}) if isinstance(index.get("metadata"), dict) else {}
        folder = os.path.dirname(index_path)
        self._where = {key: os.path.join(folder, shard) for key, shard in weight_map.items()}
        missing_files = sorted({p for p in self._where.values() if not os.path.isfile(p)})
        if missing_files:
            raise CheckpointError(f"{index_path}: shard files listed in the index are missing: {missing_files}")
        self._shards: dict[str, TensorReader] = {}
        for path in sorted(set(self._where.values())):
            shard = open_shard(path)
            self._shards[path] = shard
            listed = {k for k, p in self._where.items() if p == path}
            absent = sorted(listed - set(shard.keys()))
            if absent:
                self.close()
                raise CheckpointError(f"{path}: tensors listed in {os.path.basename(index_path)} are not in "
                                      f"this shard: {absent[:20]}")

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shards[self._where[key]].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._shards[self._where[key]].get(key)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards = {}


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: file is empty")


def open_weights(path: str) -> TensorReader:
    """A reader for one weight file or a sharded index, chosen by file name."""
    name = os.path.basename(path)
    if name.endswith(".index.json"):
        inner = SafetensorsReader if ".safetensors" in name else TorchReader
        return ShardedReader(path, inner)
    if name.endswith(".safetensors"):
        return SafetensorsReader(path)
    if name.endswith((".bin", ".pth", ".pt", ".ckpt")):
        return TorchReader(path)
    raise CheckpointError(f"{path}: unknown weight file type (expected .safetensors, .bin, .pth, .pt or an "
                          ".index.json of shards)")
