"""Data-parallel SegGPT over all devices of one host or of many, with ``jax.sharding``.

    mesh = parallel.make_mesh()                               # every device, ("data", "model") axes
    model = parallel.shard_model(model, mesh)                 # weights replicated (or weights="fsdp")
    batch = parallel.shard_batch(mesh, pixel_values=..., prompt_pixel_values=..., prompt_masks=...)
    with jax.set_mesh(mesh):                                  # the mesh in context while traced
        out = model(**batch)                                  # the usual call; XLA partitions it
    pred = parallel.local_rows(out.pred_masks)                # this process's rows, as numpy

On several hosts, call :func:`initialize` first in every process (same code everywhere: a TPU pod
slice or several GPU hosts); each process then passes its own share of the batch to ``shard_batch``
and gets the global batch's result, partitioned the same way.

The product (``Segmenter``, the server, ``Trainer``, ``tune_prompt``) reaches all this through one
class, :class:`DataParallel`: the devices it runs on (``devices=``: all by default), the one place
where a batch is padded, split over the devices and gathered back, and the model placed.

Numerics: a row's forward never mixes with another row's (the per-query feature ensemble groups stay
on one device, see :meth:`DataParallel.queries_per_device`), so a sharded forward computes the same
float32 operations per row as one device; only XLA's choice of kernels for the smaller per-device
batch can reassociate a sum (measured: max abs difference <= 2e-6 on outputs of order 1). Training
adds the gradient's all-reduce over devices: each gradient entry is a sum over the batch computed in
another order, so it differs from one device's by at most about ``(rows + log2(devices)) * 2**-24``
times the sum of the absolute per-row terms (float32 summation error bound), a relative 1e-6 or so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .nn.paths import path_key, stack_start
from .runtime import DATA_AXIS, MODEL_AXIS

logger = logging.getLogger(__name__)

DATA, MODEL = DATA_AXIS, MODEL_AXIS
WEIGHT_LAYOUTS = ("replicated", "fsdp")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kwargs: Any) -> None:
    """``jax.distributed.initialize`` for multi-host runs; on CPU also enables gloo collectives.

    With no arguments JAX detects the cluster (TPU pods, SLURM, Open MPI, Kubernetes with JobSet,
    ...). Call it before anything else touches JAX devices. A second call in one process does nothing.
    """
    if _initialized():
        return
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


def _initialized() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except (ImportError, AttributeError):  # pragma: no cover - another jax layout
        return False


# ------------------------------------------------------------------------------------ devices
def select_devices(devices: int | Sequence | None = None) -> list:
    """The devices a component runs on.

    * ``None``: every device (under ``jax.distributed``: every device of every process);
    * an int ``N``: the first ``N`` devices of each process (``1``: one device per process);
    * a list of devices: those (under ``jax.distributed`` each process must list the same ones).
    """
    everything = jax.devices()
    if devices is None:
        return list(everything)
    if isinstance(devices, bool):
        raise ValueError(f"devices must be a count or a list of devices, got {devices!r}")
    if isinstance(devices, (int, np.integer)):
        local = jax.local_device_count()
        if not 1 <= devices <= local:
            raise ValueError(f"devices={devices}: this process has {local} device{'s' if local != 1 else ''} "
                             f"({jax.default_backend()})")
        chosen = []
        for process in range(jax.process_count()):
            mine = [d for d in everything if d.process_index == process]
            chosen += mine[:int(devices)]
        return chosen
    chosen = list(devices)
    if not chosen:
        raise ValueError("devices is an empty list")
    return chosen


def host_array(value: Any) -> np.ndarray:
    """The whole value of an array as numpy, in every process (a sharded array spread over processes
    is gathered; a replicated one is read from a local copy)."""
    if not isinstance(value, jax.Array) or value.is_fully_addressable:
        return np.asarray(jax.device_get(value))
    if value.sharding.is_fully_replicated:
        return np.asarray(value.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def host_state(tree: Any) -> Any:
    """:func:`host_array` of every array leaf of a pytree (an ``nnx.State``, say)."""
    return jax.tree.map(lambda leaf: host_array(leaf) if isinstance(leaf, jax.Array) else leaf, tree)


def sync(name: str) -> None:
    """Wait until every process of a ``jax.distributed`` job reaches the same ``name`` (nothing with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process of the job (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
    return bool(np.asarray(flags).any())


_gathers = 0


def all_gather_json(name: str, value: Any) -> list:
    """Every process's ``value`` (anything JSON can hold), in process order, in every process (through
    ``jax.distributed``'s key-value store; a collective: every process must call it with the same
    ``name`` in the same order)."""
    import json

    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed

    global _gathers
    _gathers += 1
    client = distributed.global_state.client
    prefix = f"seggpt-jax/{_gathers}/{name}"
    client.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(value))
    return [json.loads(client.blocking_key_value_get(f"{prefix}/{i}", 600_000)) for i in range(jax.process_count())]


def process_sum(values: np.ndarray) -> np.ndarray:
    """The elementwise sum of a float64/int64 array over the processes of the job (a collective)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


class DataParallel:
    """Data parallelism over a set of devices: the one place where a batch is split and gathered.

    Args:
        devices: see :func:`select_devices` (default: every device).

    With one device of a single process (the default device) nothing is placed or sharded: arrays go
    to the model as they are. Otherwise the model's parameters are placed on a ``(data, model=1)``
    mesh and each batch is padded to a multiple of this process's devices, split over them, and
    gathered back as this process's rows. Under ``jax.distributed`` every process holds its own rows
    of one global batch, and every process must run the same sequence of batch shapes.
    """

    def __init__(self, devices: int | Sequence | None = None):
        self.devices = select_devices(devices)
        self.size = len(self.devices)
        process = jax.process_index()
        self.local_size = sum(1 for d in self.devices if d.process_index == process)
        if self.local_size == 0:
            raise ValueError("none of the devices given belongs to this process")
        default = self.size == 1 and jax.process_count() == 1 and self.devices[0] == jax.devices()[0]
        self.mesh = None if default else make_mesh(self.devices)

    @property
    def active(self) -> bool:
        """Whether batches are sharded (more than one device, a non-default device, or several processes)."""
        return self.mesh is not None

    @property
    def processes(self) -> int:
        return jax.process_count() if self.active else 1

    def process_rows(self, batch_size: int) -> range | None:
        """This process's rows of a global batch of ``batch_size`` (an equal share per process, in process
        order); ``None`` in a single process (every row)."""
        processes = self.processes
        if processes == 1:
            return None
        per = batch_size // processes
        return range(jax.process_index() * per, (jax.process_index() + 1) * per)

    def describe(self) -> str:
        kind = self.devices[0].platform
        where = f" in {self.processes} processes" if self.processes > 1 else ""
        return f"{self.size} {kind} device{'s' if self.size != 1 else ''}{where}"

    def place(self, model: nnx.Module, *, weights: str = "replicated") -> nnx.Module:
        """The model's parameters (and any other state) placed on the devices, in place."""
        if weights not in WEIGHT_LAYOUTS:
            raise ValueError(f"weights must be one of {WEIGHT_LAYOUTS}, got {weights!r}")
        return shard_model(model, self.mesh, weights=weights) if self.active else model

    def replicate(self, tree: Any) -> Any:
        """Every array leaf of ``tree`` (the same value in every process) replicated on the devices."""
        if not self.active:
            return tree
        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda leaf: _global_array(leaf, sharding) if isinstance(leaf, (jax.Array, np.ndarray))
                            else leaf, tree)

    def queries_per_device(self, queries: int) -> int:
        """Queries each local device gets when ``queries`` of this process's queries are padded to a
        multiple of its devices: every device holds whole queries, so a query's prompts (its feature
        ensemble group) never span two devices."""
        return max(1, math.ceil(queries / self.local_size))

    def round_up(self, queries: int) -> int:
        """``queries`` rounded up to a multiple of this process's devices (at least one per device)."""
        return self.queries_per_device(queries) * self.local_size

    def shard(self, **arrays: Any) -> dict[str, Any]:
        """This process's rows of each array -> arrays split over the devices' data axis (unchanged
        when not :attr:`active`). Rows must already divide evenly (see :meth:`pad`)."""
        if not self.active:
            return arrays
        return shard_batch(self.mesh, **arrays)

    def gather(self, array: Any) -> np.ndarray:
        """This process's rows of a result, as numpy."""
        return local_rows(array) if isinstance(array, jax.Array) else np.asarray(array)

    def context(self) -> contextlib.AbstractContextManager:
        """``jax.set_mesh`` of the devices while tracing (the flash kernel's ``shard_map`` needs it)."""
        return jax.set_mesh(self.mesh) if self.active else contextlib.nullcontext()


def pad_groups(arrays: Sequence[np.ndarray | None], group: int, groups: int) -> list[np.ndarray | None]:
    """Arrays of whole groups of ``group`` rows padded to ``groups`` groups by repeating the last group
    (``None`` entries pass through)."""
    out = []
    for array in arrays:
        if array is None:
            out.append(None)
            continue
        rows = len(array)
        missing = groups * group - rows
        if missing < 0 or rows % group or rows == 0:
            raise ValueError(f"{rows} rows are not whole groups of {group} within {groups} groups")
        out.append(array if missing == 0 else np.concatenate([array] + [array[rows - group:]] * (missing // group)))
    return out


# ------------------------------------------------------------------------------------ work sharding
def shard_of(name: str, count: int) -> int:
    """The shard (``0..count-1``) of an input named ``name``: a stable hash of the name, so that an
    input's shard does not depend on the list's order or length, and inputs of the same name (which
    would write the same outputs) fall into the same shard."""
    import hashlib

    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count  # (crc32 is linear: names one letter apart share its low bits)


def shard_from_environment(environ: dict | None = None) -> tuple[int, int] | None:
    """``(index, count)`` of this worker in an array job, from SLURM (``SLURM_ARRAY_TASK_ID`` with
    ``SLURM_ARRAY_TASK_COUNT``, else ``SLURM_PROCID`` with ``SLURM_NTASKS``) or a Kubernetes indexed
    job (``JOB_COMPLETION_INDEX``, with the count from ``JOB_COMPLETIONS`` or ``SEGGPT_JAX_SHARDS``);
    ``None`` outside one."""
    env = os.environ if environ is None else environ

    def number(name: str) -> int | None:
        text = env.get(name)
        try:
            return int(text) if text is not None and text.strip() else None
        except ValueError:
            return None

    pairs = [("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("SLURM_PROCID", "SLURM_NTASKS"),
             ("JOB_COMPLETION_INDEX", "JOB_COMPLETIONS"), ("JOB_COMPLETION_INDEX", "SEGGPT_JAX_SHARDS")]
    for index_name, count_name in pairs:
        index, count = number(index_name), number(count_name)
        if index is None or count is None or count < 1:
            continue
        if index_name == "SLURM_ARRAY_TASK_ID":
            index -= number("SLURM_ARRAY_TASK_MIN") or 0  # arrays numbered from 1 (--array=1-8)
        if 0 <= index < count:
            return index, count
    return None
