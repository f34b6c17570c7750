"""``from_pretrained`` / ``save_pretrained`` for the model classes (the work is in :mod:`seggpt_jax.weights`)."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp


class PretrainedMixin:
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                        precision: Any = None, runtime: Any = None, config: Any = None,
                        layout: str | None = None):
        """Load weights from the Hub, a local folder or file, in any supported layout.

        Args:
            name_or_path: a Hub repo id (``"BAAI/seggpt-vit-large"``), a folder in transformers layout
                (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` / sharded index) or
                written by :meth:`save_pretrained`, or one weight file such as the original BAAI
                ``seggpt_vit_large.pth``.
            revision, cache_dir, local_files_only, token: passed to ``huggingface_hub``; the Hub cache
                and ``HF_HUB_OFFLINE`` are respected, and an unreachable Hub falls back to the cache.
            dtype: compute dtype (``jnp.bfloat16`` for mixed precision); param_dtype: storage dtype.
            precision: matmul precision for every dot (``"highest"`` for float32 parity on GPU/TPU).
            runtime: a :class:`RuntimeConfig` (attention kernel, layer scan, remat); default: auto.
            config: a :class:`SegGptConfig` for files that carry none (default for those: ViT-L).
            layout: force ``"transformers"``, ``"original"`` or ``"seggpt-jax"`` instead of detecting it.

        Raises:
            CheckpointError: unreadable files, or tensors that do not fit (all problems listed).
            ModelNotFoundError: nothing found locally, in the cache, or on the Hub.
        """
        from . import load_pretrained

        return load_pretrained(cls, name_or_path, revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only, token=token, config=config, dtype=dtype,
                               param_dtype=param_dtype, precision=precision, runtime=runtime, layout=layout)

    def save_pretrained(self, save_directory: str | os.PathLike, *, layout: str = "seggpt-jax") -> None:
        """Write the weights: ``layout="seggpt-jax"`` (``config.json`` + ``model.safetensors`` keyed by Flax
        parameter path; loads back exactly), ``"transformers"`` (loads in transformers) or ``"original"``
        (BAAI names); see :func:`seggpt_jax.weights.save_pretrained`."""
        from . import save_pretrained

        save_pretrained(self, save_directory, layout=layout)
