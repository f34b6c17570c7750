"""Data-parallel SegGPT over all devices of one host or of many, with ``jax.sharding``.

    mesh = parallel.make_mesh()                               # every device, ("data", "model") axes
    model = parallel.shard_model(model, mesh)                 # weights replicated (or weights="fsdp")
    batch = parallel.shard_batch(mesh, pixel_values=..., prompt_pixel_values=..., prompt_masks=...)
    out = model(**batch)                                      # the usual call; XLA partitions it
    pred = parallel.local_rows(out.pred_masks)                # this process's rows, as numpy

On several hosts, call :func:`initialize` first in every process (same code everywhere: a TPU pod
slice or several GPU hosts); each process then passes its own share of the batch to ``shard_batch``
and gets the global batch's result, partitioned the same way.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .nn.paths import path_key, stack_start

logger = logging.getLogger(__name__)

DATA, MODEL = "data", "model"
WEIGHT_LAYOUTS = ("replicated", "fsdp")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kwargs: Any) -> None:
    """``jax.distributed.initialize`` for multi-host runs; on CPU also enables gloo collectives.

    With no arguments JAX detects the cluster (TPU pods, SLURM, ...). Call it before anything else
    touches JAX devices.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects the CPU backend
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)
    logger.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())


def make_mesh(devices: list | None = None, *, model: int = 1) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    if model < 1 or len(devices) % model:
        raise ValueError(f"model={model} must divide the {len(devices)} devices")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((len(devices) // model, model), devices=devices)
    except (ImportError, ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(len(devices) // model, model)
    return Mesh(grid, (DATA, MODEL))


def _weight_spec(shape: tuple[int, ...], mesh: Mesh, layout: str, stacked: bool = False) -> P:
    if layout == "replicated":
        return P()
    size = mesh.shape[DATA]
    # FSDP: split the largest axis that the data axis divides; small or indivisible tensors replicate.
    # Never the layer axis of a stacked parameter (a scanned model): each scan step takes one whole row.
    candidates = [i for i, d in enumerate(shape) if d % size == 0 and d >= size and not (stacked and i == 0)]
    if not candidates or int(np.prod(shape)) < 4096:
        return P()
    axis = max(candidates, key=lambda i: shape[i])
    return P(*[DATA if i == axis else None for i in range(len(shape))])


def _global_array(value: jax.Array, sharding: NamedSharding) -> jax.Array:
    """Place ``value`` (the same full value in every process) with ``sharding``, multi-process safe."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    host = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_model(model: nnx.Module, mesh: Mesh, *, weights: str = "replicated") -> nnx.Module:
    """Place every parameter on ``mesh``, in place: ``"replicated"`` (a full copy per device) or
    ``"fsdp"`` (each large tensor split over the data axis, along its largest divisible axis other than
    a stacked parameter's layer axis; XLA gathers it where it is used)."""
    if weights not in WEIGHT_LAYOUTS:
        raise ValueError(f"weights must be one of {WEIGHT_LAYOUTS}, got {weights!r}")
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        value = var[...]
        stacked = stack_start(path_key(path)) is not None
        var[...] = _global_array(value, NamedSharding(mesh, _weight_spec(tuple(value.shape), mesh, weights, stacked)))
    nnx.update(model, state)
    return model


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def shard_batch(mesh: Mesh, **arrays: Any) -> dict[str, Any]:
    """This process's rows of each array -> global arrays split over the data axis.

    The global batch is the concatenation of every process's rows in process order; it must divide
    evenly over the data axis. ``None`` values pass through; non-array values (``embedding_type="semantic"``)
    too.
    """
    out = {}
    size = mesh.shape[DATA]
    for name, value in arrays.items():
        if value is None or isinstance(value, str):
            out[name] = value
            continue
        local = np.asarray(value)
        if local.ndim == 0:
            raise ValueError(f"{name} has no batch axis")
        global_rows = local.shape[0] * jax.process_count()
        if global_rows % size:
            raise ValueError(f"{name}: a global batch of {global_rows} rows does not divide over {size} devices "
                             f"of the data axis; pad the batch")
        out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)
    return out


def local_rows(array: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array held by this process, in order, as numpy."""
    if array.is_fully_addressable:
        return np.asarray(array)
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:  # replicated along the model axis: keep one copy
            seen.add(start)
            rows.append(np.asarray(shard.data))
    return np.concatenate(rows, axis=0)
