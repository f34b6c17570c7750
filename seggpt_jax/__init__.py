"""seggpt-jax: SegGPT (Segmenting Everything In Context) in JAX / Flax NNX.

The public names below are imported on first use, so ``import seggpt_jax`` (and the command line's
``--help``) does not start JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": ".weights",
    "ModelNotFoundError": ".weights",
    "ConfigError": ".config",
    "SegGptConfig": ".config",
    "SegGptImageProcessor": ".imaging.processor",
    "RuntimeConfig": ".runtime",
    "enable_compilation_cache": ".runtime",
    "Prompt": ".inference.prompts",
    "InputFailure": ".inference.segmenter",
    "SegmentationResult": ".inference.segmenter",
    "Segmenter": ".inference.segmenter",
    "SegGptEncoderOutput": ".nn.encoder",
    "average_prompt_features": ".nn.encoder",
    "ModelSettings": ".nn.layers",
    "painter_loss": ".nn.loss",
    "painter_loss_terms": ".nn.loss",
    "SegGptForImageSegmentation": ".models",
    "SegGptImageSegmentationOutput": ".nn.models",
    "SegGptModel": ".models",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
