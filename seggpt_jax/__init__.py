"""seggpt-jax: SegGPT (Segmenting Everything In Context) in JAX / Flax NNX."""

__version__ = "0.1.0"

from .weights import CheckpointError, ModelNotFoundError
from .config import ConfigError, SegGptConfig
from .imaging.processor import SegGptImageProcessor
from .runtime import RuntimeConfig, enable_compilation_cache
from .inference.prompts import Prompt
from .inference.segmenter import InputFailure, SegmentationResult, Segmenter
from .nn.models import (
    SegGptEncoderOutput,
    SegGptForImageSegmentation,
    SegGptImageSegmentationOutput,
    SegGptModel,
    feature_ensemble,
    painter_loss,
    painter_loss_terms,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelNotFoundError",
    "InputFailure",
    "Prompt",
    "RuntimeConfig",
    "SegGptConfig",
    "SegGptEncoderOutput",
    "SegGptForImageSegmentation",
    "SegGptImageProcessor",
    "SegGptImageSegmentationOutput",
    "SegGptModel",
    "SegmentationResult",
    "Segmenter",
    "feature_ensemble",
    "painter_loss",
    "painter_loss_terms",
    "enable_compilation_cache",
    "__version__",
]
