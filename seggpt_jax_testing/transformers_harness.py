"""The transformers side of parity tests: random-weight checkpoints that transformers itself writes.

Nothing here is produced by the code under test: transformers builds and saves the models, and the
original-BAAI-layout file is written with a rename list kept in this file (independent of
``seggpt_jax.weights.tables``). Imports torch and transformers (the ``test`` extra).
"""

from __future__ import annotations

import json
import os

import torch
from transformers import SegGptConfig as HFConfig
from transformers import SegGptForImageSegmentation as HFModel
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

# transformers' own test config (tests/models/seggpt/test_modeling_seggpt.py), and non-square ones
# with the real merge index, several taps, relative positions on and off.
TINY_CONFIGS = {
    "hf_test": dict(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    hidden_act="gelu", hidden_dropout_prob=0.1, initializer_range=0.02, mlp_ratio=2.0,
                    merge_index=0, intermediate_hidden_state_indices=[1], pretrain_image_size=10,
                    decoder_hidden_size=10),
    "nonsquare": dict(image_size=[64, 32], patch_size=4, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                      merge_index=2, intermediate_hidden_state_indices=[2, 4, 5], pretrain_image_size=24,
                      decoder_hidden_size=8),
    "nonsquare_norel": dict(image_size=[64, 32], patch_size=4, hidden_size=32, num_hidden_layers=6,
                            num_attention_heads=4, merge_index=2, intermediate_hidden_state_indices=[2, 4, 5],
                            pretrain_image_size=24, decoder_hidden_size=8, use_relative_position_embeddings=False),
}


def make_hf_model(config: HFConfig, seed: int = 0) -> HFModel:
    """transformers' model with its own init, then every parameter perturbed so that biases, LayerNorm
    affine terms, tokens and relative positions all matter (a wrong mapping cannot hide)."""
    torch.manual_seed(seed)
    relative = config.use_relative_position_embeddings
    if not relative:
        # transformers 5.x cannot construct this config: SegGptPreTrainedModel._init_weights initialises
        # rel_pos_h/rel_pos_w unconditionally. Build with them, then switch them off as __init__ would.
        config.use_relative_position_embeddings = True
    model = HFModel(config).eval()
    if not relative:
        config.use_relative_position_embeddings = False
        for layer in model.model.encoder.layers:
            layer.attention.use_relative_position_embeddings = False
            del layer.attention.rel_pos_h, layer.attention.rel_pos_w
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.3 if "rel_pos" in name else 0.05 if config.hidden_size < 256
                                                  else 0.02))
    return model


# The BAAI Painter/SegGPT parameter names, written out by hand for the tests.
def to_original_names(state: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    renames = [
        ("model.embeddings.patch_embeddings.projection.", "patch_embed.proj."),
        ("model.embeddings.segment_token_input", "segment_token_x"),
        ("model.embeddings.segment_token_prompt", "segment_token_y"),
        ("model.embeddings.type_token_semantic", "type_token_cls"),
        ("model.embeddings.type_token_instance", "type_token_ins"),
        ("model.embeddings.position_embeddings", "pos_embed"),
        ("model.embeddings.mask_token", "mask_token"),
        ("model.encoder.layernorm.", "norm."),
        ("model.encoder.layers.", "blocks."),
        (".attention.", ".attn."),
        (".layernorm_before.", ".norm1."),
        (".layernorm_after.", ".norm2."),
        (".mlp.lin1.", ".mlp.fc1."),
        (".mlp.lin2.", ".mlp.fc2."),
        ("decoder.decoder_embed.", "decoder_embed."),
        ("decoder.decoder_pred.conv.", "decoder_pred.0."),
        ("decoder.decoder_pred.layernorm.", "decoder_pred.1."),
        ("decoder.decoder_pred.head.", "decoder_pred.3."),
    ]
    out = {}
    for key, value in state.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value.clone()
    return out


def write_checkpoint(model: HFModel, folder: str, fmt: str) -> str:
    """Write ``model`` in ``fmt``; return the path to hand to ``from_pretrained``."""
    os.makedirs(folder, exist_ok=True)
    state = model.state_dict()
    if fmt == "safetensors":
        model.save_pretrained(folder)
        return folder
    if fmt == "sharded-safetensors":
        model.save_pretrained(folder, max_shard_size="40KB")
        assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
        return folder
    if fmt == "bin":  # what transformers' save_pretrained(safe_serialization=False) wrote before v5
        model.config.save_pretrained(folder)
        torch.save({k: v.clone() for k, v in state.items()}, os.path.join(folder, "pytorch_model.bin"))
        return folder
    if fmt == "sharded-bin":
        model.config.save_pretrained(folder)
        keys = list(state)
        shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
            torch.save({k: state[k].clone() for k in shard}, os.path.join(folder, name))
            weight_map.update({k: name for k in shard})
        with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
        return folder
    if fmt == "original":  # seggpt_vit_large.pth: {"model": state_dict with BAAI names}
        path = os.path.join(folder, "seggpt_original.pth")
        torch.save({"model": to_original_names(state), "epoch": 0}, path)
        return path
    raise ValueError(fmt)


def hf_processor_config(config: HFConfig, folder: str) -> str:
    """transformers' ``preprocessor_config.json`` for a model config (query size: half the canvas)."""
    try:
        from transformers import SegGptImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - transformers < 5
        from transformers import SegGptImageProcessor as Processor
    height, width = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    Processor(size={"height": height // 2, "width": width}).save_pretrained(folder)
    return os.path.join(folder, "preprocessor_config.json")
