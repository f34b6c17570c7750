"""Wrong inputs are refused up front with messages that name the argument and its shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seggpt_jax import SegGptConfig, SegGptForImageSegmentation

CONFIG = SegGptConfig(image_size=(32, 16), patch_size=4, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                      merge_index=1, intermediate_hidden_state_indices=(1, 2), pretrain_image_size=16,
                      decoder_hidden_size=4)


@pytest.fixture(scope="module")
def model():
    return SegGptForImageSegmentation(CONFIG, rngs=nnx.Rngs(0))


def _inputs(batch=2, height=16, width=16, channels=3, dtype=np.float32):
    x = np.zeros((batch, channels, height, width), dtype=dtype)
    return dict(pixel_values=x, prompt_pixel_values=x.copy(), prompt_masks=x.copy())


def test_good_inputs_run(model):
    out = model(**_inputs())
    assert out.pred_masks.shape == (2, 3, 32, 16) and out.pred_masks.dtype == jnp.float32
    assert out.loss is None and len(out.intermediate_hidden_states) == 2 and out.hidden_states is None
    assert out["pred_masks"] is out.pred_masks and out.keys() == ["pred_masks", "intermediate_hidden_states"]


@pytest.mark.parametrize("change, message", [
    (dict(pixel_values=np.zeros((2, 3, 16, 15), np.float32)),
     r"pixel_values has spatial size 16x15 \(shape \(2, 3, 16, 15\)\); this model takes 16x16"),
    (dict(prompt_masks=np.zeros((2, 1, 16, 16), np.float32)), r"prompt_masks has 1 channels .* takes 3"),
    (dict(pixel_values=np.zeros((2, 16, 16, 3), np.float32)), r"pixel_values has 16 channels .*NCHW"),
    (dict(prompt_pixel_values=np.zeros((3, 16, 16), np.float32)), r"prompt_pixel_values must be a 4-D NCHW array"),
    (dict(prompt_pixel_values=np.zeros((3, 3, 16, 16), np.float32)),
     r"prompt_pixel_values has batch size 3 but pixel_values has 2"),
    (dict(pixel_values=np.zeros((2, 3, 16, 16), np.uint8)), r"pixel_values has dtype uint8; .*SegGptImageProcessor"),
    (dict(labels=np.zeros((2, 3, 8, 16), np.float32)), r"labels has spatial size 8x16"),
    (dict(bool_masked_pos=np.zeros((2, 31), bool)), r"bool_masked_pos must have shape \(1, 32\) or \(2, 32\)"),
    (dict(bool_masked_pos=np.full((1, 32), 2)), r"bool_masked_pos must hold booleans or 0/1"),
    (dict(embedding_type="panoptic"), r"embedding_type must be 'instance' or 'semantic', got 'panoptic'"),
    (dict(embedding_type=["instance"]), r"embedding_type has 1 entries for a batch of 2"),
    (dict(embedding_type=["instance", "stuff"]), r"entries must be 'instance'/'semantic' or 1/0, got 'stuff'"),
    (dict(ensemble_mode="baai"), r"ensemble_mode must be one of \('transformers', 'original'\), got 'baai'"),
    (dict(prompts_per_query=3), r"prompts_per_query must be a positive divisor of the batch size 2, got 3"),
    (dict(pixel_values=np.zeros((0, 3, 16, 16), np.float32)), r"empty batch"),
    (dict(pixel_values=None), r"pixel_values is required"),
    (dict(dropout_rng=7), r"dropout_rng must be a jax PRNG key"),
])
def test_bad_inputs_are_named(model, change, message):
    inputs = _inputs()
    inputs.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        model(**inputs)


def test_feature_ensemble_needs_an_even_number_of_patch_rows():
    odd = SegGptConfig(image_size=(40, 16), patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       merge_index=0, intermediate_hidden_state_indices=(1,), pretrain_image_size=16,
                       decoder_hidden_size=4)
    model = SegGptForImageSegmentation(odd, rngs=nnx.Rngs(0))
    inputs = _inputs(height=20)
    model(**inputs)  # fine without the ensemble (transformers' own test config has 15 rows)
    with pytest.raises(ValueError, match=r"feature_ensemble needs an even number of patch rows.*\(5, 2\)"):
        model(**inputs, feature_ensemble=True)


def test_accepted_input_kinds(model):
    inputs = _inputs(dtype=np.float64)
    reference = np.asarray(model(**_inputs()).pred_masks)
    np.testing.assert_array_equal(np.asarray(model(**inputs).pred_masks), reference)  # float64 is cast
    as_jax = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    np.testing.assert_array_equal(np.asarray(model(**as_jax).pred_masks), reference)
    flags = np.zeros((32,), bool)
    flags[16:] = True
    np.testing.assert_array_equal(np.asarray(model(**_inputs(), bool_masked_pos=flags).pred_masks), reference)
    grid_flags = flags.reshape(1, 8, 4)
    np.testing.assert_array_equal(np.asarray(model(**_inputs(), bool_masked_pos=grid_flags).pred_masks), reference)
    assert model(**_inputs(), embedding_type=jnp.array([True, False])).pred_masks.shape == (2, 3, 32, 16)
    with pytest.raises(ValueError, match=r"embedding_type flags must have shape \(2,\)"):
        model(**_inputs(), embedding_type=jnp.array([True]))
    jax.block_until_ready(model(**_inputs(), dropout_rng=jax.random.key(0)).pred_masks)


def test_constructor_checks_its_config():
    with pytest.raises(TypeError, match="config must be a SegGptConfig"):
        SegGptForImageSegmentation({"hidden_size": 8}, rngs=nnx.Rngs(0))
