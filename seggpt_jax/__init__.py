"""seggpt-jax: SegGPT (Segmenting Everything In Context) in JAX / Flax NNX."""

__version__ = "0.1.0"

from .weights import CheckpointError, ModelNotFoundError
from .config import ConfigError, SegGptConfig
from .imaging.processor import SegGptImageProcessor
from .runtime import RuntimeConfig, enable_compilation_cache
from .inference.prompts import Prompt
from .inference.segmenter import InputFailure, SegmentationResult, Segmenter
from .nn.encoder import SegGptEncoderOutput, average_prompt_features
from .nn.layers import ModelSettings
from .nn.loss import painter_loss, painter_loss_terms
from .nn.models import SegGptForImageSegmentation, SegGptImageSegmentationOutput, SegGptModel

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelNotFoundError",
    "ModelSettings",
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
    "average_prompt_features",
    "painter_loss",
    "painter_loss_terms",
    "enable_compilation_cache",
    "__version__",
]
