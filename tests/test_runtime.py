"""Every execution switch computes the same thing as the plain, unrolled reference path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_bool_masked_pos, random_inputs
from flax import nnx

from seggpt_jax import RuntimeConfig, SegGptConfig, SegGptForImageSegmentation
from seggpt_jax.nn.attention import (attention_chunked, attention_plain, attention_widened, resolve_impl, widen)
from seggpt_jax.nn.models import layer_segments

CONFIGS = {
    "nonsquare": SegGptConfig(image_size=(64, 32), patch_size=4, hidden_size=32, num_hidden_layers=6,
                              num_attention_heads=4, merge_index=2, intermediate_hidden_state_indices=(2, 4, 5),
                              pretrain_image_size=24, decoder_hidden_size=8),
    "odd_rows": SegGptConfig(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             merge_index=0, intermediate_hidden_state_indices=(1, 2), pretrain_image_size=10,
                             decoder_hidden_size=10),
    "no_rel_pos": SegGptConfig(image_size=(64, 32), patch_size=4, hidden_size=32, num_hidden_layers=4,
                               num_attention_heads=4, merge_index=1, intermediate_hidden_state_indices=(1, 3),
                               pretrain_image_size=24, decoder_hidden_size=8, use_relative_position_embeddings=False),
}


def _random_model(config, **kwargs):
    model = SegGptForImageSegmentation(config, rngs=nnx.Rngs(0), **kwargs)
    # make relative positions and LayerNorm affine terms matter
    state = nnx.state(model, nnx.Param)
    leaves = nnx.to_flat_state(state)
    key = jax.random.key(1)
    for i, (path, var) in enumerate(leaves):
        if path[-1] in ("rel_pos_h", "rel_pos_w", "scale", "bias"):
            var[...] = var[...] + 0.2 * jax.random.normal(jax.random.fold_in(key, i), var[...].shape)
    nnx.update(model, state)
    return model


def _outputs(model, inputs, **kwargs):
    out = model(**inputs, output_hidden_states=True, **kwargs)
    return [np.asarray(out.pred_masks)] + [np.asarray(h) for h in out.hidden_states] + \
        [np.asarray(t) for t in out.intermediate_hidden_states] + ([np.asarray(out.loss)] if out.loss is not None else [])


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("runtime", [
    RuntimeConfig(attention="chunked"),
    RuntimeConfig(attention="widened"),
    RuntimeConfig(attention="plain", scan_layers=True),
    RuntimeConfig(attention="chunked", scan_layers=True),
], ids=lambda r: f"{r.attention}{'-scan' if r.scan_layers else ''}")
def test_runtime_switches_match_the_plain_unrolled_path(name, runtime):
    config = CONFIGS[name]
    model = _random_model(config, runtime=RuntimeConfig(attention="plain"))
    ensemble = config.grid_size[0] % 2 == 0
    inputs = random_inputs(config, batch=3, seed=31, labels=True)
    kwargs = dict(feature_ensemble=ensemble,
                  bool_masked_pos=random_bool_masked_pos(config.num_patches, batch=3, seed=32))
    reference = _outputs(model, inputs, **kwargs)
    model.configure(attention=runtime.attention, scan_layers=runtime.scan_layers)
    assert model.model.encoder.layers[0].attention.runtime == runtime
    ours = _outputs(model, inputs, **kwargs)
    assert len(ours) == len(reference)
    for i, (a, b) in enumerate(zip(ours, reference)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"output {i}")


@pytest.mark.parametrize("grid, tile_rows", [((56, 28), None), ((56, 28), 8), ((15, 15), 5), ((7, 3), None)])
def test_attention_kernels_at_real_grid_sizes(grid, tile_rows):
    """The ViT-L grid (56 x 28: rel_pos_h has 111 rows, rel_pos_w 55) with a small head dim."""
    rows, cols = grid
    rng = np.random.default_rng(rows * cols)
    q, k, v = (jnp.asarray(rng.standard_normal((2, rows * cols, 3, 8), dtype=np.float32)) for _ in range(3))
    rel = (jnp.asarray(rng.standard_normal((2 * rows - 1, 8), dtype=np.float32)) * 0.5,
           jnp.asarray(rng.standard_normal((2 * cols - 1, 8), dtype=np.float32)) * 0.5)
    kwargs = dict(scale=8 ** -0.5, grid=grid, rel_pos=rel)
    reference = np.asarray(attention_plain(q, k, v, **kwargs))
    chunked = np.asarray(attention_chunked(q, k, v, tile_rows=tile_rows, **kwargs))
    widened = np.asarray(attention_widened(q, k, v, **kwargs))
    np.testing.assert_allclose(chunked, reference, atol=5e-6, rtol=0)
    np.testing.assert_allclose(widened, reference, atol=5e-6, rtol=0)
    # the widened dot product is the logits with the relative terms folded in, exactly
    q_wide, k_wide, v_wide = widen(q, k, v, **kwargs)
    assert q_wide.shape[-1] % 8 == 0 and q_wide.shape[-1] >= 8 + rows + cols and v_wide.shape == q_wide.shape
    with pytest.raises(ValueError, match="must divide"):
        attention_chunked(q, k, v, tile_rows=rows + 1, **kwargs)


def test_widened_attention_in_bfloat16_is_close():
    rng = np.random.default_rng(0)
    grid = (16, 8)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 128, 2, 16), dtype=np.float32)) for _ in range(3))
    rel = (jnp.asarray(rng.standard_normal((31, 16), dtype=np.float32)) * 0.3,
           jnp.asarray(rng.standard_normal((15, 16), dtype=np.float32)) * 0.3)
    reference = np.asarray(attention_plain(q, k, v, scale=0.25, grid=grid, rel_pos=rel))
    half = np.asarray(attention_widened(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                        scale=0.25, grid=grid, rel_pos=rel), dtype=np.float32)
    assert np.abs(half - reference).mean() < 0.02


def test_auto_picks_per_backend():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto", jnp.float32) == "chunked" and resolve_impl("plain", jnp.bfloat16) == "plain"
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        resolve_impl("flash", jnp.float32)


def test_layer_segments_respect_merge_and_taps():
    assert layer_segments(24, 2, {5, 11, 17, 23}) == [(0, 2), (2, 3), (3, 6), (6, 12), (12, 18), (18, 24)]
    assert layer_segments(2, 0, {1}) == [(0, 1), (1, 2)]
    assert layer_segments(6, 2, {2, 4, 5}) == [(0, 2), (2, 3), (3, 5), (5, 6)]


@pytest.fixture(scope="module")
def gradient_case():
    """A model, a training batch, and the reference gradients (plain attention, unrolled, no remat)."""
    config = CONFIGS["nonsquare"]
    model = _random_model(config, runtime=RuntimeConfig(attention="plain"))
    inputs = random_inputs(config, batch=2, seed=33, labels=True)
    inputs["bool_masked_pos"] = random_bool_masked_pos(config.num_patches, batch=2, seed=34)

    def grads(m):
        return nnx.to_flat_state(nnx.grad(lambda mm: mm(**inputs, dropout_rng=jax.random.key(5)).loss)(m))

    return model, grads, grads(model)


@pytest.mark.parametrize("policy", ["full", "dots", "everything_saveable"])
def test_remat_and_scan_give_the_same_gradients(gradient_case, policy):
    model, grads, reference = gradient_case
    model.configure(attention="chunked", scan_layers=True, remat_policy=policy)
    try:
        ours = grads(model)
    finally:
        model.configure(attention="plain", scan_layers=False, remat_policy=None)
    for (path, a), (_, b) in zip(ours, reference):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), atol=2e-5, rtol=1e-4, err_msg=str(path))


def test_runtime_config_validation():
    with pytest.raises(ValueError, match="attention must be one of"):
        RuntimeConfig(attention="flash")
    with pytest.raises(ValueError, match="unknown remat_policy 'sometimes'"):
        RuntimeConfig(remat_policy="sometimes")
    with pytest.raises(TypeError, match="runtime must be a seggpt_jax.RuntimeConfig"):
        SegGptForImageSegmentation(CONFIGS["nonsquare"], runtime={"attention": "plain"}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention must be one of"):
        SegGptForImageSegmentation(CONFIGS["nonsquare"], rngs=nnx.Rngs(0)).configure(attention="fast")
