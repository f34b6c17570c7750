"""SegGPT configuration: a frozen dataclass read from and written to a transformers-style ``config.json``.

Field names and defaults follow ``transformers.SegGptConfig`` (the defaults are the released
ViT-L painter: 896x448 canvas, patch 16, merge after layer 2, decoder taps at layers 5/11/17/23).
The config is hashable, so it can live on Flax modules as static data and in ``jax.jit`` caches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .files import write_json
from .hub import CONFIG_NAME, resolve_file

logger = logging.getLogger(__name__)

#: Activations the model implements, by their transformers ``hidden_act`` names.
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "quick_gelu")

# Keys transformers writes into config.json that are not model hyper-parameters.
_TRANSFORMERS_META_KEYS = frozenset(
    {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "seggpt_jax_version"}
)


class ConfigError(ValueError):
    """A configuration that cannot describe a working SegGPT model."""


@dataclasses.dataclass(frozen=True)
class SegGptConfig:
    """Hyper-parameters of SegGPT, with the field names and defaults of ``transformers.SegGptConfig``.

    ``image_size`` is the *canvas* size (prompt stacked over query), ``(height, width)``; an int means
    a square canvas. ``mlp_dim`` defaults to ``4 * hidden_size`` as in transformers. Sequences are
    stored as tuples so that the config is hashable.
    """

    model_type: ClassVar[str] = "seggpt"  # transformers' attribute, for code that reads it

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: tuple[int, int] = (896, 448)
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    mlp_dim: int | None = None
    drop_path_rate: float = 0.1
    pretrain_image_size: int = 224
    decoder_hidden_size: int = 64
    use_relative_position_embeddings: bool = True
    merge_index: int = 2
    intermediate_hidden_state_indices: tuple[int, ...] = (5, 11, 17, 23)
    beta: float = 0.01

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("image_size", _pair("image_size", self.image_size))
        set_("patch_size", _square_int("patch_size", self.patch_size))
        set_("pretrain_image_size", _square_int("pretrain_image_size", self.pretrain_image_size))
        indices = self.intermediate_hidden_state_indices
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
            raise ConfigError(
                f"intermediate_hidden_state_indices must be a list of layer indices, got {indices!r}"
            )
        set_("intermediate_hidden_state_indices", tuple(indices))
        if self.mlp_dim is None:
            set_("mlp_dim", int(self.hidden_size) * 4 if _is_int(self.hidden_size) else self.mlp_dim)
        self._validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid of the canvas, ``(rows, cols)``; (56, 28) for ViT-L."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def query_size(self) -> tuple[int, int]:
        """Size of one image (prompt or query) as the model takes it: half the canvas height."""
        return (self.image_size[0] // 2, self.image_size[1])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pretrain_grid(self) -> int:
        return self.pretrain_image_size // self.patch_size

    def drop_path_rates(self) -> tuple[float, ...]:
        """Per-layer stochastic-depth rates, ``linspace(0, drop_path_rate, num_hidden_layers)``."""
        n = self.num_hidden_layers
        if n == 1:
            return (0.0,)
        return tuple(self.drop_path_rate * i / (n - 1) for i in range(n))

    # ------------------------------------------------------------------ presets
    @classmethod
    def vit_large(cls) -> "SegGptConfig":
        """The released ``BAAI/seggpt-vit-large`` painter (also the original BAAI checkpoint's shape)."""
        return cls()

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> "SegGptConfig":
        """Build from a transformers-style mapping; unknown keys are ignored (logged at debug level)."""
        where = f" in {source}" if source else ""
        if not isinstance(data, Mapping):
            raise ConfigError(f"config{where} must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type not in (None, "seggpt"):
            raise ConfigError(f"config{where} has model_type={model_type!r}; expected 'seggpt'")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        unknown = sorted(set(data) - names - _TRANSFORMERS_META_KEYS)
        if unknown:
            logger.debug("ignoring config keys%s: %s", where, ", ".join(unknown))
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"invalid config{where}: {e}") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None) -> "SegGptConfig":
        """Read ``config.json`` from a local folder, a path to a ``.json`` file, the folder of a weight
        file, or a Hub repo id (through the huggingface_hub cache, with the offline detection, cache
        fallback and errors of ``SegGptForImageSegmentation.from_pretrained``).

        Raises:
            ModelNotFoundError: no config.json in the folder, on the Hub or in the cache (names which).
            ConfigError: the file is not valid JSON or does not describe a SegGPT model (names the file).
        """

        path = os.path.expanduser(os.fspath(name_or_path))
        if not (os.path.isfile(path) and path.endswith(".json")):
            path = resolve_file(path, CONFIG_NAME, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only, token=token)
        return cls.from_json_file(path)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "SegGptConfig":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data, source=path)

    def to_dict(self) -> dict[str, Any]:
        """A transformers-compatible dict (``transformers.SegGptConfig.from_dict`` reads it)."""
        out: dict[str, Any] = {"architectures": ["SegGptForImageSegmentation"], "model_type": "seggpt"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json_file(self, path: str | os.PathLike, **extra: Any) -> None:
        """Write ``config.json`` (atomically), with ``extra`` keys beside the fields."""
        write_json(path, {**self.to_dict(), **extra})

    def replace(self, **changes: Any) -> "SegGptConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        problems: list[str] = []
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "num_channels",
                     "mlp_dim", "pretrain_image_size", "decoder_hidden_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("merge_index",):
            if not _is_int(self.merge_index):
                problems.append(f"{name} must be an integer, got {self.merge_index!r}")
        for name in ("qkv_bias", "use_relative_position_embeddings"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("hidden_dropout_prob", "initializer_range", "layer_norm_eps", "drop_path_rate", "beta"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            problems.append(f"hidden_act={self.hidden_act!r} is not supported; choose one of {SUPPORTED_ACTIVATIONS}")
        if problems:  # the checks below assume well-typed fields
            raise ConfigError("; ".join(problems))

        if self.layer_norm_eps <= 0:
            problems.append(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if self.beta < 0:
            problems.append(f"beta (smooth-L1 threshold) must be >= 0, got {self.beta}")
        if not 0 <= self.drop_path_rate < 1:
            problems.append(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not 0 <= self.hidden_dropout_prob < 1:
            problems.append(f"hidden_dropout_prob must be in [0, 1), got {self.hidden_dropout_prob}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        height, width = self.image_size
        if height % self.patch_size or width % self.patch_size:
            problems.append(f"image_size {self.image_size} must be divisible by patch_size ({self.patch_size})")
        if height % 2:
            problems.append(
                f"image_size height ({height}) must be even: the canvas stacks the prompt over the query"
            )
        if self.pretrain_image_size < self.patch_size:
            problems.append(
                f"pretrain_image_size ({self.pretrain_image_size}) must be at least patch_size ({self.patch_size})"
            )
        layers = self.num_hidden_layers
        indices = self.intermediate_hidden_state_indices
        if not indices:
            problems.append("intermediate_hidden_state_indices must name at least one layer for the decoder")
        elif not all(_is_int(i) for i in indices):
            problems.append(f"intermediate_hidden_state_indices must be integers, got {list(indices)}")
        else:
            out_of_range = [i for i in indices if not 0 <= i < layers]
            if out_of_range:
                problems.append(
                    f"intermediate_hidden_state_indices {out_of_range} are outside the {layers} encoder layers"
                )
            if len(set(indices)) != len(indices):
                problems.append(f"intermediate_hidden_state_indices has duplicates: {list(indices)}")
            if not 0 <= self.merge_index < layers:
                problems.append(f"merge_index ({self.merge_index}) must be a layer index in [0, {layers})")
            elif self.merge_index > min(indices):
                problems.append(
                    f"merge_index ({self.merge_index}) must not exceed the first decoder tap "
                    f"({min(indices)}): taps are taken after the two streams are merged"
                )
        if problems:
            raise ConfigError("; ".join(problems))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(name: str, value: Any, *, minimum: int = 1) -> int:
    """The one check of a count an API takes (batch sizes, shots, frames, ...): an integer (numpy's too,
    never a bool) of at least ``minimum``; else a ``ValueError`` naming ``name``."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pair(name: str, value: Any) -> tuple[int, int]:
    if _is_int(value):
        return (value, value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 2:
        if all(_is_int(v) for v in value):
            return (int(value[0]), int(value[1]))
    raise ConfigError(f"{name} must be an integer or a pair of integers (height, width), got {value!r}")


def _square_int(name: str, value: Any) -> int:
    """transformers types these as int-or-pair but only works with one int; accept a square pair too."""
    if _is_int(value):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 2:
        a, b = value
        if _is_int(a) and a == b:
            return a
        raise ConfigError(f"{name} must be square (one integer); got {list(value)}")
    raise ConfigError(f"{name} must be an integer, got {value!r}")
