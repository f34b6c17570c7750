"""Stage-by-stage parity with transformers on tiny random-weight checkpoints written by transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, max_abs, random_bool_masked_pos, random_inputs, to_torch

from seggpt_jax import SegGptForImageSegmentation, SegGptModel

TOL = 1e-5


def _reference(hf, inputs: dict, **kwargs):
    """transformers' painter output (with hidden states) and its encoder taps."""
    with torch.no_grad():
        out = hf(**to_torch(inputs), output_hidden_states=True, **to_torch(kwargs))
        taps = hf.model(**to_torch(inputs), **to_torch(kwargs)).intermediate_hidden_states
    return out, taps


def _assert_stagewise(ours, ref, ref_taps, *, with_loss: bool):
    assert len(ours.hidden_states) == len(ref.hidden_states)
    errors = {"embeddings": max_abs(ours.hidden_states[0], ref.hidden_states[0])}
    for i, (a, b) in enumerate(zip(ours.hidden_states[1:], ref.hidden_states[1:])):
        errors[f"layer {i}"] = max_abs(a, b)
    assert len(ours.intermediate_hidden_states) == len(ref_taps)
    for i, (a, b) in enumerate(zip(ours.intermediate_hidden_states, ref_taps)):
        errors[f"tap {i}"] = max_abs(a, b)
    errors["pred_masks"] = max_abs(ours.pred_masks, ref.pred_masks)
    if with_loss:
        errors["loss"] = abs(float(ours.loss) - float(ref.loss))
    bad = {k: v for k, v in errors.items() if v > TOL}
    assert not bad, f"parity errors above {TOL}: {bad}"
    # the comparison is meaningful only if the outputs are not trivially small
    assert float(np.max(np.abs(np.asarray(ours.pred_masks)))) > 0.05


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_stagewise_parity_single_prompt(hf_tiny, name, fmt):
    hf, path = hf_tiny(name, fmt)
    model = SegGptForImageSegmentation.from_pretrained(path)
    inputs = random_inputs(model.config, batch=2, seed=1)
    ours = model(**inputs, output_hidden_states=True)
    ref, ref_taps = _reference(hf, inputs)
    _assert_stagewise(ours, ref, ref_taps, with_loss=False)


@pytest.mark.parametrize("embedding_type", ["instance", "semantic"])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_parity_with_labels_and_random_mask(hf_tiny, name, embedding_type):
    """Training-style call: labels with a random 75% bool_masked_pos per sample."""
    hf, path = hf_tiny(name)
    model = SegGptForImageSegmentation.from_pretrained(path)
    inputs = random_inputs(model.config, batch=2, seed=2, labels=True)
    masked = random_bool_masked_pos(model.config.num_patches, batch=2, seed=3)
    ours = model(**inputs, bool_masked_pos=masked, embedding_type=embedding_type, output_hidden_states=True)
    ref, ref_taps = _reference(hf, inputs, bool_masked_pos=masked, embedding_type=embedding_type)
    _assert_stagewise(ours, ref, ref_taps, with_loss=True)


def test_loss_with_default_mask_keeps_transformers_denominator(hf_tiny):
    """transformers divides by the flags of a [1, N] mask even for a batch of B; we keep that."""
    hf, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path)
    inputs = random_inputs(model.config, batch=3, seed=4, labels=True)
    ours = model(**inputs)
    with torch.no_grad():
        ref = hf(**to_torch(inputs))
    assert abs(float(ours.loss) - float(ref.loss)) <= TOL * max(1.0, abs(float(ref.loss)))


@pytest.mark.parametrize("embedding_type", ["instance", "semantic"])
@pytest.mark.parametrize("prompts", [2, 3])
@pytest.mark.parametrize("name", ["nonsquare", "nonsquare_norel"])
def test_feature_ensemble_parity(hf_tiny, name, prompts, embedding_type):
    hf, path = hf_tiny(name)
    model = SegGptForImageSegmentation.from_pretrained(path)
    inputs = random_inputs(model.config, batch=prompts, seed=5, labels=True)
    masked = random_bool_masked_pos(model.config.num_patches, batch=prompts, seed=6)
    kwargs = dict(feature_ensemble=True, embedding_type=embedding_type, bool_masked_pos=masked)
    ours = model(**inputs, output_hidden_states=True, **kwargs)
    ref, ref_taps = _reference(hf, inputs, **kwargs)
    _assert_stagewise(ours, ref, ref_taps, with_loss=True)


@pytest.mark.parametrize("mode", ["transformers", "original"])
def test_ensemble_paints_one_answer_for_a_shared_query(hf_tiny, mode):
    """Few-shot inference: one query, several prompts. The ensembled query halves agree across
    prompts (and with transformers); without the ensemble they do not."""
    hf, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path)
    inputs = random_inputs(model.config, batch=3, seed=9)
    inputs["pixel_values"] = np.repeat(inputs["pixel_values"][:1], 3, axis=0)
    half = model.config.query_size[0] + 1  # the decoder's 3x3 conv lets the first query row see the prompt
    ensembled = np.asarray(model(**inputs, feature_ensemble=True, ensemble_mode=mode).pred_masks)
    separate = np.asarray(model(**inputs).pred_masks)
    assert np.abs(ensembled[0, :, half:] - ensembled[2, :, half:]).max() < 1e-5
    assert np.abs(separate[0, :, half:] - separate[2, :, half:]).max() > 1e-3
    if mode == "transformers":
        with torch.no_grad():
            ref = hf(**to_torch(inputs), feature_ensemble=True)
        assert max_abs(ensembled, ref.pred_masks) <= TOL


def test_single_prompt_ensemble_matches_transformers_merge_layer_quirk(hf_tiny):
    """With one prompt, transformers still averages the two streams at the merge layer."""
    hf, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path)
    inputs = random_inputs(model.config, batch=1, seed=7)
    ours = model(**inputs, feature_ensemble=True, output_hidden_states=True)
    ref, ref_taps = _reference(hf, inputs, feature_ensemble=True)
    _assert_stagewise(ours, ref, ref_taps, with_loss=False)
    plain = model(**inputs)
    assert max_abs(ours.pred_masks, np.asarray(plain.pred_masks)) > 1e-4


def test_encoder_alone_matches_transformers_segggpt_model(hf_tiny):
    hf, path = hf_tiny("nonsquare")
    encoder = SegGptModel.from_pretrained(path)
    inputs = random_inputs(encoder.config, batch=2, seed=8)
    ours = encoder(**inputs, output_hidden_states=True)
    with torch.no_grad():
        ref = hf.model(**to_torch(inputs), output_hidden_states=True)
    assert max_abs(ours.last_hidden_state, ref.last_hidden_state) <= TOL
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        assert max_abs(a, b) <= TOL
    for a, b in zip(ours.intermediate_hidden_states, ref.intermediate_hidden_states):
        assert max_abs(a, b) <= TOL
