"""Checkpoint mapping tables: one per source format, each a list of (source regex, target path, transform).

Targets are parameter paths of :class:`~seggpt_jax.SegGptForImageSegmentation` joined with dots
(``model.encoder.layers.3.attention.qkv.kernel``). The encoder alone (``SegGptModel``) uses the same
paths without the ``model.`` prefix; the loader handles that.

Transforms convert PyTorch layouts to Flax ones: ``linear`` (``[out, in]`` -> ``[in, out]``) and
``conv`` (``OIHW`` -> ``HWIO``); each has an inverse for exporting.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

_LAYER = r"(?:model\.)?encoder\.layers\.(\d+)\."
_EMB = r"(?:model\.)?embeddings\."


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


IDENTITY = Transform("identity", None)
LINEAR = Transform("linear", (1, 0))  # torch Linear [out, in] -> kernel [in, out]
CONV = Transform("conv", (2, 3, 1, 0))  # torch Conv2d OIHW -> HWIO


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # regex matched against the whole source key
    target: str  # replacement template (\1 ...) giving our parameter path
    transform: Transform = IDENTITY


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    rules: tuple[Rule, ...]

    def __post_init__(self):
        object.__setattr__(self, "_compiled", tuple((re.compile(r.source), r) for r in self.rules))

    def match(self, key: str) -> tuple[str, Transform] | None:
        for pattern, rule in self._compiled:
            m = pattern.fullmatch(key)
            if m:
                return m.expand(rule.target), rule.transform
        return None


TRANSFORMERS = Table("transformers", (
    Rule(_EMB + r"patch_embeddings\.projection\.weight", "model.embeddings.patch_embeddings.projection.kernel", CONV),
    Rule(_EMB + r"patch_embeddings\.projection\.bias", "model.embeddings.patch_embeddings.projection.bias"),
    Rule(_EMB + r"(mask_token|segment_token_input|segment_token_prompt|type_token_semantic|type_token_instance"
                r"|position_embeddings)", r"model.embeddings.\1"),
    Rule(_LAYER + r"(attention\.qkv|attention\.proj|mlp\.lin1|mlp\.lin2)\.weight", r"model.encoder.layers.\1.\2.kernel",
         LINEAR),
    Rule(_LAYER + r"(attention\.qkv|attention\.proj|mlp\.lin1|mlp\.lin2)\.bias", r"model.encoder.layers.\1.\2.bias"),
    Rule(_LAYER + r"attention\.(rel_pos_h|rel_pos_w)", r"model.encoder.layers.\1.attention.\2"),
    Rule(_LAYER + r"(layernorm_before|layernorm_after)\.weight", r"model.encoder.layers.\1.\2.scale"),
    Rule(_LAYER + r"(layernorm_before|layernorm_after)\.bias", r"model.encoder.layers.\1.\2.bias"),
    Rule(r"(?:model\.)?encoder\.layernorm\.weight", "model.encoder.layernorm.scale"),
    Rule(r"(?:model\.)?encoder\.layernorm\.bias", "model.encoder.layernorm.bias"),
    Rule(r"decoder\.decoder_embed\.weight", "decoder.decoder_embed.kernel", LINEAR),
    Rule(r"decoder\.decoder_embed\.bias", "decoder.decoder_embed.bias"),
    Rule(r"decoder\.decoder_pred\.(conv|head)\.weight", r"decoder.decoder_pred.\1.kernel", CONV),
    Rule(r"decoder\.decoder_pred\.(conv|head)\.bias", r"decoder.decoder_pred.\1.bias"),
    Rule(r"decoder\.decoder_pred\.layernorm\.weight", "decoder.decoder_pred.layernorm.scale"),
    Rule(r"decoder\.decoder_pred\.layernorm\.bias", "decoder.decoder_pred.layernorm.bias"),
))

# The BAAI Painter/SegGPT code (models_seggpt.py): ``x`` is the image stream, ``y`` the mask stream;
# seg_type 0 = ``cls`` (semantic), 1 = ``ins`` (instance); decoder_pred is an nn.Sequential.
_BLOCK = r"blocks\.(\d+)\."
ORIGINAL = Table("original", (
    Rule(r"patch_embed\.proj\.weight", "model.embeddings.patch_embeddings.projection.kernel", CONV),
    Rule(r"patch_embed\.proj\.bias", "model.embeddings.patch_embeddings.projection.bias"),
    Rule(r"mask_token", "model.embeddings.mask_token"),
    Rule(r"segment_token_x", "model.embeddings.segment_token_input"),
    Rule(r"segment_token_y", "model.embeddings.segment_token_prompt"),
    Rule(r"type_token_cls", "model.embeddings.type_token_semantic"),
    Rule(r"type_token_ins", "model.embeddings.type_token_instance"),
    Rule(r"pos_embed", "model.embeddings.position_embeddings"),
    Rule(_BLOCK + r"norm1\.weight", r"model.encoder.layers.\1.layernorm_before.scale"),
    Rule(_BLOCK + r"norm1\.bias", r"model.encoder.layers.\1.layernorm_before.bias"),
    Rule(_BLOCK + r"norm2\.weight", r"model.encoder.layers.\1.layernorm_after.scale"),
    Rule(_BLOCK + r"norm2\.bias", r"model.encoder.layers.\1.layernorm_after.bias"),
    Rule(_BLOCK + r"attn\.(qkv|proj)\.weight", r"model.encoder.layers.\1.attention.\2.kernel", LINEAR),
    Rule(_BLOCK + r"attn\.(qkv|proj)\.bias", r"model.encoder.layers.\1.attention.\2.bias"),
    Rule(_BLOCK + r"attn\.(rel_pos_h|rel_pos_w)", r"model.encoder.layers.\1.attention.\2"),
    Rule(_BLOCK + r"mlp\.fc1\.weight", r"model.encoder.layers.\1.mlp.lin1.kernel", LINEAR),
    Rule(_BLOCK + r"mlp\.fc1\.bias", r"model.encoder.layers.\1.mlp.lin1.bias"),
    Rule(_BLOCK + r"mlp\.fc2\.weight", r"model.encoder.layers.\1.mlp.lin2.kernel", LINEAR),
    Rule(_BLOCK + r"mlp\.fc2\.bias", r"model.encoder.layers.\1.mlp.lin2.bias"),
    Rule(r"norm\.weight", "model.encoder.layernorm.scale"),
    Rule(r"norm\.bias", "model.encoder.layernorm.bias"),
    Rule(r"decoder_embed\.weight", "decoder.decoder_embed.kernel", LINEAR),
    Rule(r"decoder_embed\.bias", "decoder.decoder_embed.bias"),
    Rule(r"decoder_pred\.0\.weight", "decoder.decoder_pred.conv.kernel", CONV),
    Rule(r"decoder_pred\.0\.bias", "decoder.decoder_pred.conv.bias"),
    Rule(r"decoder_pred\.1\.weight", "decoder.decoder_pred.layernorm.scale"),
    Rule(r"decoder_pred\.1\.bias", "decoder.decoder_pred.layernorm.bias"),
    Rule(r"decoder_pred\.3\.weight", "decoder.decoder_pred.head.kernel", CONV),
    Rule(r"decoder_pred\.3\.bias", "decoder.decoder_pred.head.bias"),
))

# Our own layout (``save_pretrained``): keys are our parameter paths. An encoder-only save has no
# ``model.`` prefix.
NATIVE = Table("seggpt-jax", (
    Rule(r"(?:model\.)?((?:embeddings|encoder)\..+)", r"model.\1"),
    Rule(r"(decoder\..+)", r"\1"),
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
