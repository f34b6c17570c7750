"""Lazy tensor readers: key listing and shapes without reading data, then one tensor at a time.

Reading one tensor at a time (safetensors memory-maps; torch pickles are loaded with ``mmap=True``)
keeps host memory near one copy of the weights plus the largest tensor while a model is filled.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the problem."""


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


# safetensors dtype codes -> little-endian numpy dtypes (ml_dtypes ships with jax).
def _safetensors_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
            "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
            "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
            "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
            "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("bool")}


class SafetensorsReader(TensorReader):
    """Reads the safetensors format (8-byte little-endian header length, JSON header, raw data).

    Tensors are read with plain positioned reads into one array each, not through a memory map, so
    the file's pages do not stay resident while the model is filled. The header is checked up front:
    a truncated file is reported with the tensors that lie beyond its end.
    """

    _MAX_HEADER = 100 * 1024 * 1024

    def __init__(self, path: str):
        self.description = path
        self._path = path
        _check_file(path)
        size = os.path.getsize(path)
        bad = f"{path}: not a readable safetensors file (truncated or corrupt?): "
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length <= 0 or length > min(self._MAX_HEADER, size - 8):
                raise CheckpointError(bad + f"header length field says {length} bytes, the file has {size}")
            try:
                header = json.loads(f.read(length))
                if not isinstance(header, dict):
                    raise ValueError("header is not a JSON object")
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(bad + f"header is not valid JSON ({e})") from None
        metadata = header.pop("__metadata__", None) or {}
        self.metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
        dtypes = _safetensors_dtypes()
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        beyond = []
        start = 8 + length
        for key, info in header.items():
            try:
                dtype = dtypes[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(bad + f"tensor {key!r} has a malformed header entry {info!r} ({e})") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
                raise CheckpointError(bad + f"tensor {key!r}: {info['dtype']} {list(shape)} does not fill bytes "
                                            f"[{begin}, {end})")
            if start + end > size:
                beyond.append(key)
            self._entries[key] = (dtype, shape, start + begin, end - begin)
        if beyond:
            raise CheckpointError(bad + f"the file has {size} bytes but the header places {len(beyond)} tensors "
                                        f"beyond its end (e.g. {beyond[0]!r})")
        self._file = open(path, "rb")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def get(self, key: str) -> np.ndarray:
        dtype, shape, offset, nbytes = self._entries[key]
        array = np.empty(shape, dtype=dtype)
        self._file.seek(offset)
        got = self._file.readinto(array.reshape(-1).view(np.uint8)) if nbytes else 0
        if got != nbytes:
            raise CheckpointError(f"{self._path}: tensor {key!r} is cut short ({got} of {nbytes} bytes)")
        return array

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None


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
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/UnpicklingError/EOFError...
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                                  f"{type(e).__name__}: {e}") from None
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
