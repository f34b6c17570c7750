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
import logging
import os

logger = logging.getLogger(__name__)

#: Target platforms, as ``jax.export`` names them (``"gpu"`` is accepted for ``"cuda"``).
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
            parameter (``...encoder.stacks.{first layer}...``, :mod:`seggpt_jax.stacking`), and scans
            over them as stored: the forward copies no weights and needs no more memory than the
            unscanned one (``benchmarks/scan_memory.py``; figures in ``benchmarks/RESULTS.md``).
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

            ViT-L, float32, batch 1, XLA's temporaries for ``jax.value_and_grad`` of the loss (compiled,
            not run; :func:`seggpt_jax.train.estimate_memory`): 5.18 GiB without remat, 2.61 GiB with
            ``"dots"``, 1.33 GiB with ``"full"`` (the parameters and their gradients, 1.39 GiB each, come
            on top).
    """

    attention: str = "auto"
    scan_layers: bool = False
    remat_policy: str | None = None
    platform: str | None = None

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
