"""How the model runs, as opposed to what it computes: the names of every execution choice (target
platforms, attention implementations, remat policies and the activations they save), the
:class:`RuntimeConfig` that holds a model's choices, and the XLA compilation cache.

A model holds its :class:`RuntimeConfig` once (in its ``settings``, static data of the graph);
``model.with_runtime(...)`` gives a new model over the same parameters, compiled anew on its first
call. None of these switches changes the result beyond float32 rounding; the tests check each
against the plain path. This module imports nothing heavy (no JAX at import time), so the command
line can list these names in its ``--help`` without starting JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

#: Target platforms, as ``jax.export`` names them (``"gpu"`` is accepted for ``"cuda"``). Adding a
#: platform (AMD's ``"rocm"``, say, once it can be tested) means adding it here.
PLATFORMS = ("cpu", "cuda", "gpu", "tpu")
#: Attention implementations (:mod:`seggpt_jax.nn.attention`).
ATTENTION_IMPLS = ("auto", "plain", "chunked", "flash", "widened")

#: The activations each transformer layer names with ``jax.ad_checkpoint.checkpoint_name``
#: (:class:`seggpt_jax.nn.layers.SegGptLayer`): the outputs of its matmuls.
#:
#: * ``"qkv"``: ``attention.qkv`` output, ``[B, N, 3, heads, hd]``
#: * ``"attention"``: ``softmax(scale q.k + relative terms) v`` before the projection, ``[B, N, heads, hd]``
#: * ``"attention_out"``: ``attention.proj`` output, ``[B, h, w, C]``
#: * ``"mlp_hidden"``: ``mlp.lin1`` output before the activation, ``[B, h, w, mlp_dim]``
#:
#: (``mlp.lin2``'s output is not named: only a residual add follows it, so no backward pass needs it.)
MATMUL_OUTPUTS = ("qkv", "attention", "attention_out", "mlp_hidden")

#: ``checkpoint_name``s of what the fused attention kernels keep for their own backward pass: the
#: output and the per-query log-sum-exp (``[B * heads, N]`` float32) of
#: :mod:`seggpt_jax.nn.chunked_attention` and of :mod:`seggpt_jax.nn.flash_attention`.
CHUNKED_OUT_NAME, CHUNKED_LSE_NAME = "chunked_attention_out", "chunked_attention_lse"
FLASH_OUT_NAME, FLASH_LSE_NAME = "flash_out", "flash_lse"
#: Without them the backward pass reruns the kernel's whole forward to get the log-sum-exp back.
ATTENTION_RESIDUALS = (CHUNKED_OUT_NAME, CHUNKED_LSE_NAME, FLASH_OUT_NAME, FLASH_LSE_NAME)

#: The axes of a device mesh (:func:`seggpt_jax.parallel.make_mesh`): the batch is split over ``"data"``;
#: ``"model"`` is the second axis (the flash kernel splits heads over it). Layers read them from the mesh
#: they are traced under.
DATA_AXIS, MODEL_AXIS = "data", "model"

#: Our remat policy names (see :class:`RuntimeConfig`); ``jax.checkpoint_policies`` names are accepted too.
REMAT_POLICIES = ("full", "dots", "none")


def platform_name(platform: str | None) -> str:
    """``jax.export``'s name for a target platform: ``"cpu"``, ``"cuda"`` (also for ``"gpu"``) or ``"tpu"``;
    ``None``: ``jax.default_backend()``. Any other name is a ``ValueError``."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    if not isinstance(platform, str) or platform.lower() not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    name = platform.lower()
    return "cuda" if name == "gpu" else name


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Execution switches.

    Attributes:
        attention: the attention implementation (:mod:`seggpt_jax.nn.attention`):

            * ``"auto"``: ``"chunked"`` on CPU, ``"flash"`` on GPU and TPU (float32 included: the
              kernel follows the model's ``precision``), resolved for ``platform``.
            * ``"plain"``: the reference; full ``[B, heads, N, N]`` logits.
            * ``"chunked"``: per-head query tiles (``lax.map``); nothing N x N.
            * ``"flash"``: the fused Pallas kernel (:mod:`seggpt_jax.nn.flash_attention`): Triton on
              GPU, Mosaic on TPU; nothing N x N, forward or backward. On CPU it runs in Pallas'
              interpret mode: correct but slow, for tests only.
            * ``"widened"``: relative terms folded into q/k (head dim 64 -> 152 for ViT-L) for
              ``jax.nn.dot_product_attention``: cuDNN's fused attention on GPU (bfloat16/float16
              only; JAX takes head dim 152 only on Hopper or newer, and traces it only on a machine
              with a GPU and cuDNN, so it cannot be exported from elsewhere); XLA's attention with
              full logits on CPU and TPU.
        platform: the platform the model is compiled for: ``"cpu"``, ``"cuda"`` (or ``"gpu"``,
            stored as ``"cuda"``) or ``"tpu"``; ``None`` (default): ``jax.default_backend()`` when
            traced. It resolves ``"auto"`` and picks the flash kernel's lowering, so a program can be
            lowered and exported (``jax.export``) for a machine this one is not, e.g. a TPU program
            on a CPU host (:mod:`seggpt_jax.export`).
        scan_layers: run runs of identical layers with ``lax.scan`` (segments split at the merge
            layer and at every decoder tap): one compiled layer per segment, same numbers. The model
            then *holds* each segment's parameters stacked, one array with a leading layer axis per
            parameter (``...encoder.stacks.{first layer}...``, :mod:`seggpt_jax.nn.paths`), and scans
            over them as stored: the forward copies no weights and needs no more memory than the
            unscanned one (measured by ``benchmarks/scan_memory.py``, in ``benchmarks/RESULTS.md``).
            Outside the model nothing changes: checkpoints in every layout, training-state files,
            trainable regexes and the layer-wise learning-rate decay name layers one by one
            (``...encoder.layers.{i}...``), so scanned and unscanned models read and write the same
            files. Switching it (``model.with_runtime(scan_layers=...)``) restacks or unstacks the
            parameters into a new model; a seed builds the same weights either way.
        remat_policy: rematerialise each transformer layer in the backward pass (``None``: keep every
            activation the backward pass needs). The layer's input is always kept; the recomputation
            runs in the backward pass, one layer at a time, on every backend (:func:`seggpt_jax.nn.ops.remat`:
            plain ``jax.checkpoint`` is undone by XLA:CPU's scheduler).

            * ``"full"``: save nothing inside the layer; the backward pass reruns its whole forward.
            * ``"dots"``: save the outputs of the layer's matmuls (:data:`MATMUL_OUTPUTS`: ``qkv``,
              ``attention``, ``attention_out``, ``mlp_hidden``) and the attention kernel's log-sum-exp
              (:data:`ATTENTION_RESIDUALS`); recompute the LayerNorms, the activation, the residual
              adds, drop-path and the feature ensemble. The attention's forward is not rerun.
            * ``"none"``: save everything (as no remat, through the remat wrapper).
            * any ``jax.checkpoint_policies`` policy name, e.g. ``"dots_with_no_batch_dims_saveable"``.

            How much memory each policy saves is measured in ``benchmarks/RESULTS.md``
            (:func:`seggpt_jax.train.estimate_memory` compiles a training step to say it for a config).
        cpu_tile_queries: at most this many queries per tile of the chunked attention (tiles are
            whole grid rows that divide the grid); ``None`` (default): the value for this machine's
            CPU (:func:`cpu_tile_queries`). Only the speed changes, not the numbers.
    """

    attention: str = "auto"
    scan_layers: bool = False
    remat_policy: str | None = None
    platform: str | None = None
    cpu_tile_queries: int | None = None

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.platform is not None:
            if not isinstance(self.platform, str) or self.platform.lower() not in PLATFORMS:
                raise ValueError(f"platform must be one of {PLATFORMS} or None, got {self.platform!r}")
            object.__setattr__(self, "platform", platform_name(self.platform))
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers must be True or False, got {self.scan_layers!r}")
        if self.remat_policy is not None:
            remat_policy(self.remat_policy)  # validates
        if self.cpu_tile_queries is not None and (isinstance(self.cpu_tile_queries, bool)
                                                  or not isinstance(self.cpu_tile_queries, int)
                                                  or self.cpu_tile_queries < 1):
            raise ValueError(f"cpu_tile_queries must be a positive int or None, got {self.cpu_tile_queries!r}")


#: Compute dtypes a model runs in (activations and matmuls; LayerNorm statistics and the softmax stay
#: float32). Adding one means adding it here.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_HALF = ("bfloat16", "float16")
#: Matmul precisions (``jax.lax.Precision`` names); ``None``: the backend's default (on GPU/TPU it rounds
#: float32 matmul inputs, to TF32 or one bfloat16 pass).
PRECISIONS = ("default", "high", "highest")


def dtype_name(dtype: Any) -> str:
    """The one spelling of a compute dtype: a name of :data:`COMPUTE_DTYPES` from a name, a numpy/jax
    dtype or a scalar type (``jnp.bfloat16``); anything else is a ``ValueError``."""
    name = getattr(dtype, "name", None) if not isinstance(dtype, str) else dtype
    if name is None:
        name = getattr(dtype, "__name__", None) or str(dtype)
        import numpy as np

        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    name = str(name).lower()
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    return name


def precision_name(precision: Any) -> str | None:
    """The one spelling of a matmul precision: ``None`` or a name of :data:`PRECISIONS` (from a name or a
    ``jax.lax.Precision``)."""
    if precision is None:
        return None
    name = getattr(precision, "name", precision)
    name = str(name).lower()
    if name not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")
    return name


def exact_precision(dtype: Any) -> str | None:
    """The precision that keeps a compute dtype's own arithmetic on GPU/TPU: ``"highest"`` for float32
    (XLA's default there rounds float32 matmul inputs), ``None`` for half precision. What a program
    exported for serving in float32 runs with, and what parity checks against transformers use."""
    return "highest" if dtype_name(dtype) == "float32" else None


def backend_of(platform: str | None) -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"`` for a target platform; ``None``: ``jax.default_backend()``."""
    name = platform_name(platform)
    return "gpu" if name == "cuda" else name


def resolve_attention(impl: str, dtype: Any, platform: str | None = None) -> str:
    """The implementation ``impl`` means for a compute ``dtype`` on a target ``platform`` (default: the
    default backend): ``"auto"`` is ``"chunked"`` on CPU and ``"flash"`` on GPU and TPU in every dtype
    (the kernel accumulates in float32 and follows the model's precision in its own matmuls, and holds
    nothing ``N x N``; see :mod:`seggpt_jax.nn.attention`).

    Raises ``ValueError`` for an unknown name, and for ``"widened"`` in float32 on GPU (cuDNN's fused
    attention takes half precision only)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    backend = backend_of(platform)
    if impl == "auto":
        return "chunked" if backend == "cpu" else "flash"
    if impl == "widened" and backend == "gpu" and dtype_name(dtype) not in _HALF:
        raise ValueError(f"attention='widened' on GPU is cuDNN's fused attention, which takes bfloat16 or float16, "
                         f"not {dtype_name(dtype)}; use 'flash' (or 'auto')")
    return impl


#: Queries per tile of the chunked (CPU) attention at most, by the kind of CPU (:func:`cpu_kind`); any
#: kind not listed takes ``"default"``. Tiles are whole grid rows that divide the grid (ViT-L: 28 queries
#: per row, 56 rows), so a value picks the largest such tile. Each entry is the fastest tile that
#: ``python -m benchmarks.cpu_tile`` timed on that kind (``benchmarks/RESULTS.md``): on the Intel
#: AVX-512 kind tiles of 28 rows (784 queries, 4.9 MB of float32 logits) and of a whole head (1568) are
#: within 2% of each other and 6% faster than 14 rows; the smaller of the two holds half the memory.
#: ``"default"`` is the former value for every machine (14 rows of ViT-L).
CPU_TILE_QUERIES = {"intel-avx512": 784, "default": 512}


def cpu_kind(cpuinfo: str | None = None) -> str:
    """The kind of this machine's CPU, as :data:`CPU_TILE_QUERIES` keys it: the vendor and the widest x86
    vector instruction set, ``"intel-avx512"``, ``"amd-avx512"``, ``"intel-avx2"``, ``"amd-avx2"``, or
    ``"other"`` (another vendor or architecture, or no ``/proc/cpuinfo``). ``cpuinfo``: the text of a
    ``/proc/cpuinfo`` (this machine's when ``None``)."""
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip() and fields:
            break  # the first processor's block says it for all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(fields.get("vendor_id", ""))
    flags = set(fields.get("flags", "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else None
    return f"{vendor}-{isa}" if vendor and isa else "other"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_tile_queries(runtime: "RuntimeConfig | None" = None) -> int:
    """Queries per chunked-attention tile at most: ``runtime.cpu_tile_queries`` when set, else
    :data:`CPU_TILE_QUERIES` for this machine's :func:`cpu_kind`."""
    if runtime is not None and runtime.cpu_tile_queries is not None:
        return runtime.cpu_tile_queries
    return CPU_TILE_QUERIES.get(cpu_kind(), CPU_TILE_QUERIES["default"])


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """How a model runs, resolved once from its settings when it is built (:class:`ModelSettings`):
    every layer reads these fields and decides nothing itself.

    Attributes:
        platform: the target, ``"cpu"``, ``"cuda"`` or ``"tpu"`` (``RuntimeConfig.platform``, or the
            default backend when the model was built).
        attention: the implementation every layer runs (``"auto"`` resolved, :func:`resolve_attention`).
        dtype: the compute dtype (:data:`COMPUTE_DTYPES`); precision: the matmul precision
            (:data:`PRECISIONS` or ``None``).
        scan_layers, remat_policy: as in :class:`RuntimeConfig`.
        tile_queries: queries per tile of the chunked attention at most (:func:`cpu_tile_queries`).
        interpret: run the Pallas kernel in its interpreter (on CPU, where it has no compiled form).
        gpu_backend: the Pallas lowering on GPU (``"triton"``: it also runs on A100s, where Mosaic GPU
            needs sm_90; see :mod:`seggpt_jax.nn.flash_attention`).
    """

    platform: str
    attention: str
    dtype: str
    precision: str | None
    scan_layers: bool
    remat_policy: str | None
    tile_queries: int = CPU_TILE_QUERIES["default"]
    interpret: bool = False
    gpu_backend: str = "triton"


def plan(runtime: "RuntimeConfig", dtype: Any, precision: Any) -> ExecutionPlan:
    """Resolve a :class:`RuntimeConfig` with a compute dtype and a precision into an :class:`ExecutionPlan`."""
    name = platform_name(runtime.platform)
    return ExecutionPlan(platform=name, attention=resolve_attention(runtime.attention, dtype, name),
                         dtype=dtype_name(dtype), precision=precision_name(precision),
                         scan_layers=runtime.scan_layers, remat_policy=runtime.remat_policy,
                         tile_queries=cpu_tile_queries(runtime), interpret=name == "cpu")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """How a model computes, fixed when it is built (``model.with_settings(...)`` gives a new model).

    Attributes:
        dtype: compute dtype of activations and matmuls (``jnp.bfloat16`` for mixed precision);
            LayerNorm statistics and the softmax stay float32. The parameters keep their own dtype.
        precision: matmul precision of every dot (``None``: the backend default; ``"highest"`` for
            float32 parity on GPU/TPU); a string is normalised to ``jax.lax.Precision``.
        runtime: execution switches (attention kernel, layer scan, remat, target platform).
        plan: the :class:`ExecutionPlan` the three resolve to, once, here.
    """

    dtype: Any = "float32"
    precision: Any = None
    runtime: "RuntimeConfig | None" = None
    plan: ExecutionPlan | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        import jax
        import jax.numpy as jnp

        object.__setattr__(self, "dtype", jnp.dtype(dtype_name(self.dtype)))
        name = precision_name(self.precision)
        object.__setattr__(self, "precision", None if name is None else jax.lax.Precision(name))
        if self.runtime is None:
            object.__setattr__(self, "runtime", RuntimeConfig())
        if not isinstance(self.runtime, RuntimeConfig):
            raise TypeError(f"runtime must be a seggpt_jax.RuntimeConfig, got {type(self.runtime).__name__}")
        object.__setattr__(self, "plan", plan(self.runtime, self.dtype, self.precision))


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy for a name: one of :data:`REMAT_POLICIES`, or a
    ``jax.checkpoint_policies`` policy (``"everything_saveable"``, ``"dots_saveable"``, ...)."""
    import jax

    ours = {"full": jax.checkpoint_policies.nothing_saveable,
            "dots": jax.checkpoint_policies.save_only_these_names(*MATMUL_OUTPUTS, *ATTENTION_RESIDUALS),
            "none": jax.checkpoint_policies.everything_saveable}
    if name in ours:
        return ours[name]
    policy = getattr(jax.checkpoint_policies, name, None)
    if name.startswith("_") or not name.endswith("saveable") or not callable(policy):
        known = sorted(set(REMAT_POLICIES) | {n for n in dir(jax.checkpoint_policies) if n.endswith("saveable")})
        raise ValueError(f"unknown remat_policy {name!r}; choose one of {known}")
    return policy


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "seggpt_jax", "xla")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str:
    """Persist compiled programs across processes (JAX's persistent compilation cache).

    A second process that runs the same shapes then loads the compiled program instead of compiling
    it. Returns the folder used (default ``~/.cache/seggpt_jax/xla``, or ``$SEGGPT_JAX_CACHE``).
    """
    folder = os.fspath(path) if path is not None else os.environ.get("SEGGPT_JAX_CACHE") or default_cache_dir()
    os.makedirs(folder, exist_ok=True)
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.info("JAX persistent compilation cache: %s", folder)
    return folder
