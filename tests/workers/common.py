"""A tiny seeded model and inputs, identical in every worker process."""

from __future__ import annotations

import numpy as np

from seggpt_jax import SegGptConfig

CONFIG = SegGptConfig(image_size=(64, 32), patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      merge_index=1, intermediate_hidden_state_indices=(1, 3), pretrain_image_size=24,
                      decoder_hidden_size=8)


def build_model():
    from flax import nnx

    from seggpt_jax import SegGptForImageSegmentation

    return SegGptForImageSegmentation(CONFIG, rngs=nnx.Rngs(0))


def global_inputs(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(123)
    shape = (batch, 3, *CONFIG.query_size)
    return {k: rng.standard_normal(shape, dtype=np.float32)
            for k in ("pixel_values", "prompt_pixel_values", "prompt_masks", "labels")}
