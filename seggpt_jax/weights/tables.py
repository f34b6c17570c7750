"""Checkpoint mapping tables: one per layout, each a list of two-way rules.

A :class:`Rule` pairs a checkpoint key template with a parameter path template of
:class:`~seggpt_jax.SegGptForImageSegmentation` (``model.encoder.layers.{layer}.attention.qkv.kernel``) and
a layout :class:`Transform`. Both templates are compiled from the same fields, so one rule reads a
checkpoint key (:meth:`Table.match`) and names the key of a parameter when saving
(:meth:`Table.source_for`): the inverse is not a second table. Template syntax: literal text,
``{field}`` (a value matched by ``FIELDS[field]`` and carried across), and ``[text]``: optional in a
checkpoint key, written out except for the encoder alone (transformers' ``SegGptModel`` has no
``model.`` prefix). The encoder alone (``SegGptModel``) has our paths without ``model.``; the loader
handles that.

Transforms convert PyTorch layouts to Flax ones: ``linear`` (``[out, in]`` -> ``[in, out]``) and
``conv`` (``OIHW`` -> ``HWIO``); :meth:`Transform.invert` undoes them for saving.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

#: What each ``{field}`` of a template matches.
FIELDS = {
    "layer": r"\d+",
    "token": r"mask_token|segment_token_input|segment_token_prompt|type_token_semantic|type_token_instance"
             r"|position_embeddings",
    "linear": r"attention\.qkv|attention\.proj|mlp\.lin1|mlp\.lin2",
    "layernorm": r"layernorm_before|layernorm_after",
    "rel_pos": r"rel_pos_h|rel_pos_w",
    "qkv_proj": r"qkv|proj",
    "conv": r"conv|head",
    "part": r"embeddings|encoder",
    "rest": r".+",
}
_TOKEN = re.compile(r"\{(\w+)\}|\[([^\]]*)\]|([^{\[]+)")


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    perm: tuple[int, ...] | None  # axis permutation from the source layout to ours; None = identity

    def apply(self, array: np.ndarray) -> np.ndarray:
        return array if self.perm is None else np.transpose(array, self.perm)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """Our shape for a source shape; ``None`` when the source has the wrong rank."""
        if self.perm is None:
            return tuple(shape)
        if len(shape) != len(self.perm):
            return None
        return tuple(shape[i] for i in self.perm)

    def invert(self, array: np.ndarray) -> np.ndarray:
        return array if self.perm is None else np.transpose(array, np.argsort(self.perm))

    def source_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The source layout's shape for one of ours (the inverse of :meth:`shape`)."""
        return tuple(shape) if self.perm is None else tuple(shape[i] for i in np.argsort(self.perm))


IDENTITY = Transform("identity", None)
LINEAR = Transform("linear", (1, 0))  # torch Linear [out, in] -> kernel [in, out]
CONV = Transform("conv", (2, 3, 1, 0))  # torch Conv2d OIHW -> HWIO


@dataclasses.dataclass(frozen=True)
class _Template:
    parts: tuple[tuple[str, str], ...]  # ("text" | "field" | "optional", value)

    @classmethod
    def parse(cls, text: str) -> "_Template":
        parts, position = [], 0
        for m in _TOKEN.finditer(text):
            if m.start() != position:
                break
            position = m.end()
            field, optional, literal = m.groups()
            if field is not None and field not in FIELDS:
                raise ValueError(f"template {text!r}: unknown field {{{field}}}; known: {sorted(FIELDS)}")
            parts.append(("field", field) if field is not None else ("optional", optional) if optional is not None
                         else ("text", literal))
        if position != len(text):
            raise ValueError(f"template {text!r}: cannot parse from position {position}")
        return cls(tuple(parts))

    @property
    def fields(self) -> list[str]:
        return [value for kind, value in self.parts if kind == "field"]

    def regex(self) -> re.Pattern:
        pieces = {"text": re.escape, "optional": lambda v: f"(?:{re.escape(v)})?",
                  "field": lambda v: f"(?P<{v}>{FIELDS[v]})"}
        return re.compile("".join(pieces[kind](value) for kind, value in self.parts))

    def fill(self, values: dict[str, str], *, optional: bool) -> str:
        return "".join(values[value] if kind == "field" else value if kind == "text" or optional else ""
                       for kind, value in self.parts)


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # checkpoint key template, e.g. "[model.]encoder.layers.{layer}.{linear}.weight"
    target: str  # our parameter path template with the same fields (no optional parts)
    transform: Transform = IDENTITY

    def __post_init__(self):
        source, target = _Template.parse(self.source), _Template.parse(self.target)
        if sorted(source.fields) != sorted(target.fields) or len(set(source.fields)) != len(source.fields):
            raise ValueError(f"rule {self.source!r} -> {self.target!r}: both sides need the same fields, once each")
        if any(kind == "optional" for kind, _ in target.parts):
            raise ValueError(f"rule target {self.target!r}: parameter paths have no optional parts")
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_source_re", source.regex())
        object.__setattr__(self, "_target_re", target.regex())

    def forward(self, key: str) -> str | None:
        """Our parameter path for a checkpoint key, or ``None`` if this rule does not cover it."""
        m = self._source_re.fullmatch(key)
        return None if m is None else self._target.fill(m.groupdict(), optional=True)

    def backward(self, target: str, *, optional: bool = True) -> str | None:
        """The checkpoint key for one of our parameter paths (``optional=False`` leaves ``[...]`` out)."""
        m = self._target_re.fullmatch(target)
        return None if m is None else self._source.fill(m.groupdict(), optional=optional)


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    rules: tuple[Rule, ...]

    def match(self, key: str) -> tuple[str, Transform] | None:
        """``(our parameter path, transform)`` for a checkpoint key; ``None`` if no rule covers it."""
        for rule in self.rules:
            target = rule.forward(key)
            if target is not None:
                return target, rule.transform
        return None

    def source_for(self, target: str, *, optional: bool = True) -> tuple[str, Transform] | None:
        """``(checkpoint key, transform)`` for one of our parameter paths: :meth:`match` run backwards.

        ``optional=False`` writes keys without their optional parts (the encoder alone in transformers
        layout: ``embeddings.mask_token``, not ``model.embeddings.mask_token``).
        """
        for rule in self.rules:
            key = rule.backward(target, optional=optional)
            if key is not None:
                return key, rule.transform
        return None


_LAYER = "[model.]encoder.layers.{layer}."
_EMB = "[model.]embeddings."
TRANSFORMERS = Table("transformers", (
    Rule(_EMB + "patch_embeddings.projection.weight", "model.embeddings.patch_embeddings.projection.kernel", CONV),
    Rule(_EMB + "patch_embeddings.projection.bias", "model.embeddings.patch_embeddings.projection.bias"),
    Rule(_EMB + "{token}", "model.embeddings.{token}"),
    Rule(_LAYER + "{linear}.weight", "model.encoder.layers.{layer}.{linear}.kernel", LINEAR),
    Rule(_LAYER + "{linear}.bias", "model.encoder.layers.{layer}.{linear}.bias"),
    Rule(_LAYER + "attention.{rel_pos}", "model.encoder.layers.{layer}.attention.{rel_pos}"),
    Rule(_LAYER + "{layernorm}.weight", "model.encoder.layers.{layer}.{layernorm}.scale"),
    Rule(_LAYER + "{layernorm}.bias", "model.encoder.layers.{layer}.{layernorm}.bias"),
    Rule("[model.]encoder.layernorm.weight", "model.encoder.layernorm.scale"),
    Rule("[model.]encoder.layernorm.bias", "model.encoder.layernorm.bias"),
    Rule("decoder.decoder_embed.weight", "decoder.decoder_embed.kernel", LINEAR),
    Rule("decoder.decoder_embed.bias", "decoder.decoder_embed.bias"),
    Rule("decoder.decoder_pred.{conv}.weight", "decoder.decoder_pred.{conv}.kernel", CONV),
    Rule("decoder.decoder_pred.{conv}.bias", "decoder.decoder_pred.{conv}.bias"),
    Rule("decoder.decoder_pred.layernorm.weight", "decoder.decoder_pred.layernorm.scale"),
    Rule("decoder.decoder_pred.layernorm.bias", "decoder.decoder_pred.layernorm.bias"),
))

# The BAAI Painter/SegGPT code (models_seggpt.py): ``x`` is the image stream, ``y`` the mask stream;
# seg_type 0 = ``cls`` (semantic), 1 = ``ins`` (instance); decoder_pred is an nn.Sequential.
_BLOCK = "blocks.{layer}."
_OURS = "model.encoder.layers.{layer}."
ORIGINAL = Table("original", (
    Rule("patch_embed.proj.weight", "model.embeddings.patch_embeddings.projection.kernel", CONV),
    Rule("patch_embed.proj.bias", "model.embeddings.patch_embeddings.projection.bias"),
    Rule("mask_token", "model.embeddings.mask_token"),
    Rule("segment_token_x", "model.embeddings.segment_token_input"),
    Rule("segment_token_y", "model.embeddings.segment_token_prompt"),
    Rule("type_token_cls", "model.embeddings.type_token_semantic"),
    Rule("type_token_ins", "model.embeddings.type_token_instance"),
    Rule("pos_embed", "model.embeddings.position_embeddings"),
    Rule(_BLOCK + "norm1.weight", _OURS + "layernorm_before.scale"),
    Rule(_BLOCK + "norm1.bias", _OURS + "layernorm_before.bias"),
    Rule(_BLOCK + "norm2.weight", _OURS + "layernorm_after.scale"),
    Rule(_BLOCK + "norm2.bias", _OURS + "layernorm_after.bias"),
    Rule(_BLOCK + "attn.{qkv_proj}.weight", _OURS + "attention.{qkv_proj}.kernel", LINEAR),
    Rule(_BLOCK + "attn.{qkv_proj}.bias", _OURS + "attention.{qkv_proj}.bias"),
    Rule(_BLOCK + "attn.{rel_pos}", _OURS + "attention.{rel_pos}"),
    Rule(_BLOCK + "mlp.fc1.weight", _OURS + "mlp.lin1.kernel", LINEAR),
    Rule(_BLOCK + "mlp.fc1.bias", _OURS + "mlp.lin1.bias"),
    Rule(_BLOCK + "mlp.fc2.weight", _OURS + "mlp.lin2.kernel", LINEAR),
    Rule(_BLOCK + "mlp.fc2.bias", _OURS + "mlp.lin2.bias"),
    Rule("norm.weight", "model.encoder.layernorm.scale"),
    Rule("norm.bias", "model.encoder.layernorm.bias"),
    Rule("decoder_embed.weight", "decoder.decoder_embed.kernel", LINEAR),
    Rule("decoder_embed.bias", "decoder.decoder_embed.bias"),
    Rule("decoder_pred.0.weight", "decoder.decoder_pred.conv.kernel", CONV),
    Rule("decoder_pred.0.bias", "decoder.decoder_pred.conv.bias"),
    Rule("decoder_pred.1.weight", "decoder.decoder_pred.layernorm.scale"),
    Rule("decoder_pred.1.bias", "decoder.decoder_pred.layernorm.bias"),
    Rule("decoder_pred.3.weight", "decoder.decoder_pred.head.kernel", CONV),
    Rule("decoder_pred.3.bias", "decoder.decoder_pred.head.bias"),
))

# Our own layout (``save_pretrained``): keys are our parameter paths. An encoder-only save has no
# ``model.`` prefix.
NATIVE = Table("seggpt-jax", (
    Rule("[model.]{part}.{rest}", "model.{part}.{rest}"),
    Rule("decoder.{rest}", "decoder.{rest}"),
))

TABLES = {table.name: table for table in (NATIVE, TRANSFORMERS, ORIGINAL)}

#: safetensors metadata written by ``save_pretrained``; its presence marks the native layout.
NATIVE_METADATA_KEY = "seggpt_jax_layout"


def detect_format(keys: list[str], metadata: dict[str, str]) -> Table | None:
    """Which table fits a checkpoint, from its metadata or its key names."""
    if NATIVE_METADATA_KEY in metadata:
        return NATIVE
    keyset = set(keys)
    if any(k.endswith((".kernel", ".scale")) for k in keyset):
        return NATIVE
    if any(k.endswith("patch_embeddings.projection.weight") for k in keyset):
        return TRANSFORMERS
    if "patch_embed.proj.weight" in keyset or any(k.startswith("blocks.") for k in keyset):
        return ORIGINAL
    return None
