"""One compilation per shape, mixed precision, and use inside jax/nnx transformations."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seggpt_jax import SegGptConfig, SegGptForImageSegmentation, SegGptModel
from seggpt_jax.nn.models import _forward_jit

CONFIG = SegGptConfig(image_size=(32, 16), patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      merge_index=1, intermediate_hidden_state_indices=(1, 3), pretrain_image_size=16,
                      decoder_hidden_size=8, beta=0.0123)  # a config no other test compiles


def _inputs(seed, batch=2, labels=False):
    rng = np.random.default_rng(seed)
    shape = (batch, 3, 16, 16)
    out = {k: rng.standard_normal(shape, dtype=np.float32) for k in ("pixel_values", "prompt_pixel_values",
                                                                       "prompt_masks")}
    if labels:
        out["labels"] = rng.standard_normal(shape, dtype=np.float32)
    return out


def test_no_recompilation_for_new_values_or_embedding_types():
    model = SegGptForImageSegmentation(CONFIG, rngs=nnx.Rngs(0))
    before = _forward_jit._cache_size()
    first = model(**_inputs(0)).pred_masks
    assert _forward_jit._cache_size() == before + 1
    model(**_inputs(1))
    model(**_inputs(2), embedding_type="semantic")
    model(**_inputs(3), embedding_type=["semantic", "instance"])
    model(**_inputs(4), bool_masked_pos=np.ones((1, CONFIG.num_patches), bool))
    assert _forward_jit._cache_size() == before + 1
    # updating a parameter in place does not recompile either, and is seen by the next call
    model.decoder.decoder_pred.head.bias[...] = model.decoder.decoder_pred.head.bias[...] + 1.0
    second = model(**_inputs(0)).pred_masks
    np.testing.assert_allclose(np.asarray(second), np.asarray(first) + 1.0, atol=1e-5)
    assert _forward_jit._cache_size() == before + 1
    model(**_inputs(5, labels=True))  # a new input structure is a new program, once
    model(**_inputs(6, labels=True))
    assert _forward_jit._cache_size() == before + 2


def test_encoder_compiles_once_too():
    encoder = SegGptModel(CONFIG, rngs=nnx.Rngs(1))
    before = _forward_jit._cache_size()
    for seed in range(3):
        out = encoder(**_inputs(seed))
    assert _forward_jit._cache_size() == before + 1
    assert out.last_hidden_state.shape == (2, 8, 4, 32)


def test_bfloat16_compute_with_float32_parameters():
    full = SegGptForImageSegmentation(CONFIG, rngs=nnx.Rngs(0))
    mixed = SegGptForImageSegmentation(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert all(v[...].dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(mixed)))
    inputs = _inputs(7)
    a = np.asarray(full(**inputs, output_hidden_states=True).pred_masks)
    out = mixed(**inputs, output_hidden_states=True)
    assert out.pred_masks.dtype == jnp.float32 and out.hidden_states[-1].dtype == jnp.bfloat16
    b = np.asarray(out.pred_masks)
    assert np.abs(a - b).mean() < 0.02 * np.abs(a).mean() + 1e-3


def _lowered_text(model, inputs) -> str:
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision(None):  # the backend's default (conftest sets "highest" off CPU)
        return jax.jit(lambda s, x: nnx.merge(graphdef, s)(**x).pred_masks).lower(state, inputs).as_text()


def _matmul_precisions(text: str) -> list[tuple[str, list[str]]]:
    """Every dot_general and convolution of a lowered program, with its per-operand precisions
    (``precision = [HIGHEST, HIGHEST]`` or ``precision_config = [#stablehlo<precision HIGHEST>, ...]``)."""
    ops = re.findall(r"stablehlo\.(?:dot_general|convolution)\b[^\n]*", text)
    return [(op, re.findall(r"\b(DEFAULT|HIGH|HIGHEST)\b",
                            "".join(re.findall(r"precision(?:_config)? = \[([^]]*)\]", op)))) for op in ops]


def test_precision_option_is_used():
    """``precision="highest"`` reaches every matmul of the lowered program. On CPU both settings run the
    same float32 arithmetic, so only the program tells them apart (on GPU/TPU the default runs TF32 or
    bfloat16 passes)."""
    inputs = _inputs(8)
    highest, default = (_matmul_precisions(_lowered_text(SegGptForImageSegmentation(CONFIG, rngs=nnx.Rngs(0), **kw),
                                                         inputs))
                        for kw in (dict(precision="highest"), {}))
    assert len(highest) == len(default) >= CONFIG.num_hidden_layers * 4  # qkv, attention, projection, MLP
    assert all(levels == ["HIGHEST", "HIGHEST"] for _, levels in highest), highest
    assert all(levels in (["DEFAULT", "DEFAULT"], ["HIGHEST", "HIGHEST"]) for _, levels in default), default
    fixed = [op for op, levels in default if levels == ["HIGHEST", "HIGHEST"]]
    # HIGHEST whatever the setting: only the position-embedding resize (seggpt_jax.nn.ops), a product with
    # constant interpolation weights, one per axis
    assert len(fixed) <= 2 and all("%cst" in op for op in fixed), fixed
    assert len(default) - len(fixed) >= CONFIG.num_hidden_layers * 4
    # and the outputs agree (to float32 on CPU; within TF32 rounding of the default elsewhere)
    outputs = [np.asarray(SegGptForImageSegmentation(CONFIG, rngs=nnx.Rngs(0), **kw)(**inputs).pred_masks)
               for kw in (dict(precision="highest"), {})]
    np.testing.assert_allclose(*outputs, atol=1e-5 if jax.default_backend() == "cpu" else 1e-2)


def test_inside_jit_and_grad():
    model = SegGptForImageSegmentation(CONFIG, rngs=nnx.Rngs(0))
    inputs = _inputs(9, labels=True)
    direct = model(**inputs)

    @nnx.jit
    def loss_and_grads(model, batch):
        return nnx.value_and_grad(lambda m: m(**batch).loss)(model)

    loss, grads = loss_and_grads(model, inputs)
    np.testing.assert_allclose(float(loss), float(direct.loss), rtol=1e-6)
    flat = dict(nnx.to_flat_state(grads))
    assert all(np.all(np.isfinite(np.asarray(g[...]))) for g in flat.values())
    assert np.abs(np.asarray(flat[("decoder", "decoder_embed", "kernel")][...])).max() > 0
    assert np.abs(np.asarray(flat[("model", "embeddings", "mask_token")][...])).max() > 0

    pred = jax.jit(lambda x: model(x, inputs["prompt_pixel_values"], inputs["prompt_masks"]).pred_masks)(
        inputs["pixel_values"])
    np.testing.assert_allclose(np.asarray(pred), np.asarray(direct.pred_masks), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_drop_path_is_active_only_with_a_key_and_deterministic(seed):
    model = SegGptForImageSegmentation(CONFIG.replace(drop_path_rate=0.5), rngs=nnx.Rngs(0))
    inputs = _inputs(10, batch=4)
    plain = np.asarray(model(**inputs).pred_masks)
    one = np.asarray(model(**inputs, dropout_rng=jax.random.key(seed)).pred_masks)
    two = np.asarray(model(**inputs, dropout_rng=jax.random.key(seed)).pred_masks)
    np.testing.assert_array_equal(one, two)
    assert np.abs(one - plain).max() > 1e-4
