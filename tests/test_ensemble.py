"""The BAAI ("original") feature ensemble, per-sample embedding types, several queries per batch."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import max_abs, random_inputs, to_torch
from transformers.models.seggpt import modeling_seggpt

from seggpt_jax import SegGptForImageSegmentation

TOL = 1e-5


@contextlib.contextmanager
def baai_feature_ensemble(hf_model):
    """Patch transformers' layers to ensemble the way the BAAI Painter/SegGPT code does.

    In ``models_seggpt.py`` a block gets ``merge=1`` (average the query half within each stream) for
    layers up to and including the merge layer and ``merge=2`` (average over the batch) after it,
    and only when there is more than one prompt. This reference is written here from that
    description, independently of seggpt_jax.
    """
    merge_index = hf_model.config.merge_index
    layers = hf_model.model.encoder.layers

    def forward(self, hidden_states, ensemble_cond, feature_ensemble=False, output_attentions=False):
        attention = self.attention(self.layernorm_before(hidden_states))[0]
        rows = attention.shape[0]
        prompts = rows // 2 if self.seggpt_index <= merge_index else rows
        if feature_ensemble and prompts > 1:
            top, bottom = attention.split(attention.shape[1] // 2, dim=1)
            if self.seggpt_index <= merge_index:
                bottom = bottom.reshape(2, prompts, -1).mean(dim=1, keepdim=True).expand(2, prompts, -1)
                bottom = bottom.reshape(top.shape)
            else:
                bottom = bottom.mean(dim=0, keepdim=True).expand_as(bottom)
            attention = torch.cat([top, bottom], dim=1)
        hidden_states = attention + hidden_states
        return (hidden_states + self.mlp(self.layernorm_after(hidden_states)),)

    for i, layer in enumerate(layers):
        layer.seggpt_index = i
    original = modeling_seggpt.SegGptLayer.forward
    modeling_seggpt.SegGptLayer.forward = forward
    try:
        yield
    finally:
        modeling_seggpt.SegGptLayer.forward = original


@pytest.mark.parametrize("prompts", [2, 3])
def test_original_mode_matches_baai_reference(hf_tiny, prompts):
    hf, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path)
    inputs = random_inputs(model.config, batch=prompts, seed=11)
    ours = model(**inputs, feature_ensemble=True, ensemble_mode="original")
    with torch.no_grad(), baai_feature_ensemble(hf):
        ref = hf(**to_torch(inputs), feature_ensemble=True)
    assert max_abs(ours.pred_masks, ref.pred_masks) <= TOL
    transformers_mode = model(**inputs, feature_ensemble=True)
    assert max_abs(transformers_mode.pred_masks, ref.pred_masks.numpy()) > 1e-4  # the modes do differ


def test_original_mode_does_nothing_with_one_prompt(hf_tiny):
    _, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path)
    inputs = random_inputs(model.config, batch=1, seed=12)
    plain = np.asarray(model(**inputs).pred_masks)
    original = np.asarray(model(**inputs, feature_ensemble=True, ensemble_mode="original").pred_masks)
    np.testing.assert_array_equal(plain, original)


def test_mixed_embedding_types_equal_separate_calls(hf_tiny):
    _, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path)
    inputs = random_inputs(model.config, batch=2, seed=13)
    mixed = np.asarray(model(**inputs, embedding_type=["semantic", "instance"]).pred_masks)
    as_flags = np.asarray(model(**inputs, embedding_type=np.array([0, 1])).pred_masks)
    semantic = np.asarray(model(**inputs, embedding_type="semantic").pred_masks)
    instance = np.asarray(model(**inputs, embedding_type="instance").pred_masks)
    np.testing.assert_allclose(mixed[0], semantic[0], atol=1e-6)
    np.testing.assert_allclose(mixed[1], instance[1], atol=1e-6)
    np.testing.assert_array_equal(mixed, as_flags)
    assert np.abs(semantic - instance).max() > 1e-4


@pytest.mark.parametrize("mode", ["transformers", "original"])
def test_several_queries_in_one_batch(hf_tiny, mode):
    """prompts_per_query=P: a batch of Q*P ensembles each group of P like Q separate calls."""
    _, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path)
    inputs = random_inputs(model.config, batch=4, seed=14)
    together = np.asarray(model(**inputs, feature_ensemble=True, ensemble_mode=mode,
                                prompts_per_query=2).pred_masks)
    for start in (0, 2):
        part = {k: v[start:start + 2] for k, v in inputs.items()}
        alone = np.asarray(model(**part, feature_ensemble=True, ensemble_mode=mode).pred_masks)
        np.testing.assert_allclose(together[start:start + 2], alone, atol=1e-6)
