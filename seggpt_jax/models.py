"""The public model classes: the Flax NNX modules of :mod:`seggpt_jax.nn` with what a user of
transformers expects around them: ``from_pretrained``, ``save_pretrained``, the processor that belongs
to the checkpoint, and ``export``.

The modules in :mod:`seggpt_jax.nn` know nothing of files; this module stands above them, the weight
formats, the processor and the exporter, so that the model package stays a leaf.

**One processor per model** (:func:`seggpt_jax.imaging.processor.processor_for`): a model built from a checkpoint holds the
processor its ``preprocessor_config.json`` describes (the defaults when it has none), with the size
the model takes; every consumer (the :class:`~seggpt_jax.Segmenter`, the trainers, export, the command
line and the server) asks the model for it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax.numpy as jnp

from .config import SegGptConfig
from .export import export_model
from .imaging.processor import SegGptImageProcessor, default_processor, processor_for  # noqa: F401
from .nn import models as nn_models
from .weights import load_pretrained, save_pretrained

logger = logging.getLogger(__name__)

__all__ = ["SegGptForImageSegmentation", "SegGptModel", "default_processor", "processor_for"]


def _fitted(processor: SegGptImageProcessor, config: SegGptConfig, source: str) -> SegGptImageProcessor:
    """``processor`` resizing to the one size the model takes (a checkpoint's file may say otherwise)."""
    height, width = config.query_size
    if processor.size != {"height": height, "width": width}:
        logger.info("%s resizes to %s; the model takes %dx%d images, so that size is used", source,
                    processor.size, height, width)
    data = processor.to_dict()
    data["size"] = {"height": height, "width": width}
    return SegGptImageProcessor.from_dict(data)


class _Pretrained:
    """Loading, saving and the processor, for both public classes."""

    config: SegGptConfig

    def _init_processor(self, processor: SegGptImageProcessor | None) -> None:
        chosen = default_processor(self.config) if processor is None else _fitted(processor, self.config,
                                                                                  "the processor given")
        self.preprocessing = json.dumps(chosen.to_dict(), sort_keys=True)  # static, hashable

    @property
    def processor(self) -> SegGptImageProcessor:
        """The processor that belongs to this model (see the module doc)."""
        return SegGptImageProcessor.from_dict(json.loads(self.preprocessing))

    def _construction(self) -> dict[str, Any]:
        return {"processor": self.processor}

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                        precision: Any = None, runtime: Any = None, config: Any = None,
                        layout: str | None = None):
        """Load weights from the Hub, a local folder or file, in any supported layout, with the processor
        of the checkpoint (its ``preprocessor_config.json``; the defaults without one).

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
        hub_options = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        processor = SegGptImageProcessor.from_pretrained(name_or_path, **hub_options)
        return load_pretrained(cls, name_or_path, config=config, dtype=dtype, param_dtype=param_dtype,
                               precision=precision, runtime=runtime, layout=layout,
                               model_kwargs={"processor": processor}, **hub_options)

    def save_pretrained(self, save_directory: str | os.PathLike, *, layout: str = "seggpt-jax") -> None:
        """Write the weights: ``layout="seggpt-jax"`` (``config.json`` + ``model.safetensors`` keyed by Flax
        parameter path; loads back exactly), ``"transformers"`` (loads in transformers) or ``"original"``
        (BAAI names); see :func:`seggpt_jax.weights.save_pretrained`. A processor other than the defaults
        is written beside them (``preprocessor_config.json``), so that it travels with the weights."""
        save_pretrained(self, save_directory, layout=layout)
        if self.processor != default_processor(self.config):
            self.processor.save_pretrained(save_directory)


class SegGptModel(_Pretrained, nn_models.SegGptModel):
    """The SegGPT encoder (embeddings + transformer), transformers' ``SegGptModel`` (see
    :class:`seggpt_jax.nn.models.SegGptModel`), with loading, saving and its processor."""

    def __init__(self, config: SegGptConfig, *, processor: SegGptImageProcessor | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._init_processor(processor)


class SegGptForImageSegmentation(_Pretrained, nn_models.SegGptForImageSegmentation):
    """The SegGPT painter, transformers' ``SegGptForImageSegmentation`` (see
    :class:`seggpt_jax.nn.models.SegGptForImageSegmentation` for the call), with loading, saving, its
    processor, and export for serving."""

    def __init__(self, config: SegGptConfig, *, processor: SegGptImageProcessor | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._init_processor(processor)

    def export(self, batch_size: int, **options: Any):
        """This forward lowered with ``jax.export`` for serving (``platforms=``, ``dtype=``,
        ``prompts_per_query=``, ...: :func:`seggpt_jax.export.export_model`); ``.save(folder)`` writes it,
        with this model's processor."""
        return export_model(self, batch_size, **options)
