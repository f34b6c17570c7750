"""Full-size ViT-L parity: transformers writes random weights at the default config, inputs come from
transformers' image processor, and pred_masks must agree to 1e-4 in float32."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from conftest import make_hf_model, max_abs
from PIL import Image
from transformers import SegGptConfig as HFConfig

from seggpt_jax import SegGptConfig, SegGptForImageSegmentation

try:  # transformers >= 5 names the Pillow backend explicitly; 4.x has only the one processor
    from transformers import SegGptImageProcessorPil as HFImageProcessor
except ImportError:  # pragma: no cover
    from transformers import SegGptImageProcessor as HFImageProcessor

pytestmark = pytest.mark.vit_large


def _processor_inputs():
    rng = np.random.default_rng(0)
    query = Image.fromarray(rng.integers(0, 256, (500, 350, 3), dtype=np.uint8))
    prompt = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8))
    mask = np.zeros((300, 420, 3), dtype=np.uint8)
    mask[60:240, 100:300] = (255, 255, 255)
    inputs = HFImageProcessor()(images=query, prompt_images=prompt, prompt_masks=Image.fromarray(mask),
                                return_tensors="pt", do_convert_rgb=False)
    return {k: v for k, v in inputs.items()}


def test_vit_large_random_weights_parity(tmp_path):
    assert SegGptConfig() == SegGptConfig.vit_large()
    hf = make_hf_model(HFConfig(), seed=0)
    hf.save_pretrained(tmp_path)
    inputs = _processor_inputs()
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True)
    ref_hidden = [h.numpy() for h in ref.hidden_states]
    ref_pred = ref.pred_masks.numpy()
    del hf, ref
    gc.collect()

    model = SegGptForImageSegmentation.from_pretrained(tmp_path)
    assert model.config == SegGptConfig.vit_large()
    out = model(**{k: v.numpy() for k, v in inputs.items()}, output_hidden_states=True)
    errors = {"embeddings": max_abs(out.hidden_states[0], ref_hidden[0])}
    errors["worst layer"] = max(max_abs(a, b) for a, b in zip(out.hidden_states[1:], ref_hidden[1:]))
    errors["pred_masks"] = max_abs(out.pred_masks, ref_pred)
    print("ViT-L parity (max abs error):", errors)
    assert float(np.abs(ref_pred).max()) > 0.1
    assert errors["pred_masks"] <= 1e-4, errors
