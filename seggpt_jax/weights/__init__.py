"""Checkpoint formats: reading (transformers, original BAAI, ours), mapping tables, saving."""

from .loader import fill_parameters, flat_parameters, load_pretrained, path_key, save_pretrained, write_safetensors
from .readers import CheckpointError, open_weights, read_safetensors
from ..hub import ModelNotFoundError, resolve, resolve_file
from .tables import NATIVE, ORIGINAL, TABLES, TRANSFORMERS, detect_format

__all__ = [
    "CheckpointError", "ModelNotFoundError", "NATIVE", "ORIGINAL", "TABLES", "TRANSFORMERS", "detect_format",
    "fill_parameters", "flat_parameters", "load_pretrained", "path_key", "open_weights", "read_safetensors", "resolve",
    "resolve_file", "save_pretrained", "write_safetensors",
]
