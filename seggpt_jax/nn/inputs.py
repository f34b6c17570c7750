"""Validation and normalisation of the arrays a caller hands to the model.

Everything here looks only at shapes and dtypes, so it works on numpy arrays, jax arrays and
tracers alike, and every problem is reported in terms of the caller's argument names and shapes
rather than as a failure deep inside XLA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..arrays import from_torch
from ..config import SegGptConfig

EMBEDDING_TYPES = ("semantic", "instance")  # index 0 = semantic, 1 = instance (the BAAI code's seg_type)


def default_embedding_type(num_labels: int | None) -> str:
    """The task embedding a mode defaults to, everywhere (inference, training, prompt tuning): ``"instance"``
    for binary masks, ``"semantic"`` for class ids (``num_labels``)."""
    return "instance" if num_labels is None else "semantic"
ENSEMBLE_MODES = ("transformers", "original")


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Static switches of one forward; each distinct value is one compilation."""

    feature_ensemble: bool = False
    ensemble_mode: str = "transformers"
    output_hidden_states: bool = False
    prompts_per_query: int | None = None


def _as_float_array(name: str, value: Any, expected: tuple[int, ...]) -> jax.Array | np.ndarray:
    if value is None:
        raise ValueError(f"{name} is required")
    value = from_torch(value)
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        try:
            value = np.asarray(value)
        except Exception as e:  # pragma: no cover - exotic inputs
            raise TypeError(f"{name} must be an array, got {type(value).__name__}") from e
    if not isinstance(value, (jax.Array, np.ndarray)):
        value = np.asarray(value)  # other array-likes
    shape = tuple(value.shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must be a 4-D NCHW array (batch, {expected[0]}, {expected[1]}, {expected[2]}), "
                         f"got shape {shape}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(
            f"{name} has dtype {value.dtype}; the model takes normalised float pixel values "
            "(use SegGptImageProcessor, or rescale and normalise with the ImageNet mean/std)"
        )
    if shape[1] != expected[0]:
        raise ValueError(
            f"{name} has {shape[1]} channels (shape {shape}); this model takes {expected[0]} "
            f"(NCHW layout: batch, channels, height, width)"
        )
    if shape[2:] != expected[1:]:
        raise ValueError(
            f"{name} has spatial size {shape[2]}x{shape[3]} (shape {shape}); this model takes "
            f"{expected[1]}x{expected[2]} images (half of the {2 * expected[1]}x{expected[2]} canvas)"
        )
    if isinstance(value, np.ndarray):
        return np.asarray(value, dtype=np.float32)
    return value.astype(jnp.float32)


def default_bool_masked_pos(config: SegGptConfig) -> np.ndarray:
    """``[1, N]``: the query half of the mask canvas is masked, as transformers does at inference."""
    n = config.num_patches
    flags = np.zeros((1, n), dtype=bool)
    flags[:, n // 2:] = True
    return flags


def _bool_masked_pos(value: Any, config: SegGptConfig, batch: int):
    n = config.num_patches
    if value is None:
        return default_bool_masked_pos(config)
    value = from_torch(value)
    if not isinstance(value, (jax.Array, np.ndarray)):
        value = np.asarray(value)
    shape = tuple(value.shape)
    rows, cols = config.grid_size
    if len(shape) == 1 and shape[0] == n:
        value, shape = value.reshape(1, n), (1, n)
    elif len(shape) == 3 and shape[1:] == (rows, cols):
        value, shape = value.reshape(shape[0], n), (shape[0], n)
    if len(shape) != 2 or shape[1] != n or shape[0] not in (1, batch):
        raise ValueError(
            f"bool_masked_pos must have shape (1, {n}) or ({batch}, {n}) (one flag per patch of the "
            f"{rows}x{cols} canvas grid), got {shape}"
        )
    if isinstance(value, np.ndarray):
        if value.dtype != bool:
            if not np.all((value == 0) | (value == 1)):
                raise ValueError("bool_masked_pos must hold booleans or 0/1 values")
            value = value.astype(bool)
        return value
    return value if value.dtype == jnp.bool_ else value.astype(jnp.float32)


def embedding_type_flags(embedding_type: Any, batch: int) -> np.ndarray | jax.Array:
    """``[batch]`` booleans, True for 'instance'. Accepts a name, one name per sample, or 0/1 flags."""
    if embedding_type is None:
        embedding_type = "instance"
    if isinstance(embedding_type, str):
        if embedding_type not in EMBEDDING_TYPES:
            raise ValueError(f"embedding_type must be 'instance' or 'semantic', got {embedding_type!r}")
        return np.full((batch,), embedding_type == "instance", dtype=bool)
    if isinstance(embedding_type, jax.Array):
        if embedding_type.shape != (batch,):
            raise ValueError(f"embedding_type flags must have shape ({batch},), got {embedding_type.shape}")
        return embedding_type.astype(jnp.bool_)
    if isinstance(embedding_type, Sequence) or isinstance(embedding_type, np.ndarray):
        items = list(np.asarray(embedding_type).tolist()) if isinstance(embedding_type, np.ndarray) else list(embedding_type)
        if len(items) != batch:
            raise ValueError(f"embedding_type has {len(items)} entries for a batch of {batch}")
        flags = []
        for item in items:
            if isinstance(item, str) and item in EMBEDDING_TYPES:
                flags.append(item == "instance")
            elif isinstance(item, (bool, int, np.integer, np.bool_)) and int(item) in (0, 1):
                flags.append(bool(item))
            else:
                raise ValueError(
                    f"embedding_type entries must be 'instance'/'semantic' or 1/0, got {item!r}"
                )
        return np.asarray(flags, dtype=bool)
    raise ValueError(f"embedding_type must be 'instance' or 'semantic' (or one per sample), got {embedding_type!r}")


def _prompt_valid(value: Any, batch: int, prompts: int, feature_ensemble: bool):
    """``[batch]`` bool flags of the prompts that take part in their query's ensemble, or None (all)."""
    if value is None:
        return None
    if not feature_ensemble:
        raise ValueError("prompt_valid selects the prompts of a feature ensemble: it needs feature_ensemble=True")
    value = from_torch(value)
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
        value = np.asarray(value)
    if not isinstance(value, (jax.Array, np.ndarray)):
        value = np.asarray(value)
    if tuple(value.shape) != (batch,):
        raise ValueError(f"prompt_valid must hold one flag per sample, shape ({batch},), got {tuple(value.shape)}")
    if isinstance(value, np.ndarray):
        if value.dtype != bool and not np.all((value == 0) | (value == 1)):
            raise ValueError("prompt_valid must hold booleans or 0/1 values")
        value = value.astype(bool)
        if not np.all(value.reshape(-1, prompts).any(axis=1)):
            raise ValueError("prompt_valid leaves a query without any prompt: each group of prompts_per_query "
                             "samples needs at least one valid prompt")
        return value
    return value.astype(jnp.bool_)


def prepare(
    config: SegGptConfig,
    pixel_values: Any,
    prompt_pixel_values: Any,
    prompt_masks: Any,
    bool_masked_pos: Any = None,
    feature_ensemble: bool = False,
    embedding_type: Any = "instance",
    labels: Any = None,
    ensemble_mode: str = "transformers",
    output_hidden_states: bool = False,
    prompts_per_query: int | None = None,
    dropout_rng: Any = None,
    prompt_valid: Any = None,
    valid: Any = None,
) -> tuple[dict[str, Any], ForwardOptions]:
    """Check the caller's arguments; return the array inputs and the static options."""
    expected = (config.num_channels, *config.query_size)
    pixel_values = _as_float_array("pixel_values", pixel_values, expected)
    batch = pixel_values.shape[0]
    if batch == 0:
        raise ValueError("pixel_values has an empty batch")
    arrays = {"pixel_values": pixel_values}
    for name, value in (("prompt_pixel_values", prompt_pixel_values), ("prompt_masks", prompt_masks), ("labels", labels)):
        if value is None and name == "labels":
            arrays[name] = None
            continue
        arr = _as_float_array(name, value, expected)
        if arr.shape[0] != batch:
            raise ValueError(f"{name} has batch size {arr.shape[0]} but pixel_values has {batch}")
        arrays[name] = arr
    arrays["bool_masked_pos"] = _bool_masked_pos(bool_masked_pos, config, batch)
    arrays["is_instance"] = embedding_type_flags(embedding_type, batch)
    if ensemble_mode not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble_mode must be one of {ENSEMBLE_MODES}, got {ensemble_mode!r}")
    feature_ensemble = bool(feature_ensemble)
    if prompts_per_query is not None:
        if isinstance(prompts_per_query, bool) or not isinstance(prompts_per_query, (int, np.integer)) \
                or prompts_per_query <= 0 or batch % prompts_per_query:
            raise ValueError(
                f"prompts_per_query must be a positive divisor of the batch size {batch}, got {prompts_per_query!r}"
            )
        prompts_per_query = int(prompts_per_query)
    if feature_ensemble and config.grid_size[0] % 2:
        raise ValueError(
            f"feature_ensemble needs an even number of patch rows to split prompt and query halves; "
            f"this config's canvas grid is {config.grid_size}"
        )
    if dropout_rng is not None and not (isinstance(dropout_rng, jax.Array) and (
            jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key) or dropout_rng.shape == (2,))):
        raise TypeError("dropout_rng must be a jax PRNG key (jax.random.key(seed)) or None")
    arrays["dropout_rng"] = dropout_rng
    arrays["prompt_valid"] = _prompt_valid(prompt_valid, batch, prompts_per_query or batch, feature_ensemble)
    if valid is not None and labels is None:
        raise ValueError("valid selects the pixels the loss counts: it needs labels")
    arrays["valid"] = None if valid is None else from_torch(valid)
    options = ForwardOptions(
        feature_ensemble=feature_ensemble,
        ensemble_mode=ensemble_mode,
        output_hidden_states=bool(output_hidden_states),
        prompts_per_query=prompts_per_query,
    )
    return arrays, options
