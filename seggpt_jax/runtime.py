"""How the model runs, as opposed to what it computes: attention kernel, layer scan, remat, XLA cache.

:class:`RuntimeConfig` lives on the modules as static data, so changing it (``model.configure(...)``)
gives a new compiled program with the same parameters. None of these switches changes the result
beyond float32 rounding; the tests check each against the plain path.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

from .nn.attention import ATTENTION_IMPLS

logger = logging.getLogger(__name__)

#: Names accepted for ``remat_policy``: ours, or any attribute of ``jax.checkpoint_policies``.
REMAT_ALIASES = {
    "full": "nothing_saveable",  # recompute everything in the backward pass
    "dots": "dots_with_no_batch_dims_saveable",  # keep matmul outputs, recompute the rest
    "none": "everything_saveable",
}


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Execution switches.

    Attributes:
        attention: ``"auto"`` (per backend: chunked on CPU/TPU, cuDNN-widened in half precision on
            GPU), ``"plain"`` (reference: full logits), ``"chunked"`` (per-head tiles, nothing
            N x N), or ``"widened"`` (relative terms folded into q/k for ``jax.nn.dot_product_attention``).
        scan_layers: run runs of identical layers with ``lax.scan`` (segments split at the merge
            layer and at every decoder tap): faster compiles, same numbers.
        remat_policy: rematerialise each layer in the backward pass: ``"full"``, ``"dots"``, or any
            ``jax.checkpoint_policies`` name; ``None`` keeps all activations.
    """

    attention: str = "auto"
    scan_layers: bool = False
    remat_policy: str | None = None

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers must be True or False, got {self.scan_layers!r}")
        if self.remat_policy is not None:
            remat_policy(self.remat_policy)  # validates


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy for a name."""
    target = REMAT_ALIASES.get(name, name)
    policy = getattr(jax.checkpoint_policies, target, None)
    if policy is None or not callable(policy) or target.startswith("_"):
        known = sorted(set(REMAT_ALIASES) | {n for n in dir(jax.checkpoint_policies) if n.endswith("saveable")})
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
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.info("JAX persistent compilation cache: %s", folder)
    return folder
