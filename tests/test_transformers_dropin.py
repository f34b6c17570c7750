"""seggpt-jax as a drop-in for transformers: the BAAI/seggpt-vit-large model card's example and
transformers' own SegGPT integration-test patterns, run once on transformers and once with only the
imports changed, against one random-weight checkpoint that transformers wrote (model and processor).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from conftest import max_abs
from PIL import Image

import seggpt_jax
from seggpt_jax_testing.transformers_harness import hf_processor_config
from seggpt_jax_testing.hub import fill_hub_cache

try:
    from transformers import SegGptImageProcessorPil as HFProcessor
except ImportError:  # pragma: no cover - transformers 4.x has only one processor
    from transformers import SegGptImageProcessor as HFProcessor

QUERY_SIZE = {"height": 32, "width": 32}  # the "nonsquare" config's 64x32 canvas, not the default 448x448

# The model card's example; only the data lines differ (``ds`` is given, ``checkpoint`` is a local folder).
CARD = """
import torch
from transformers import SegGptImageProcessor, SegGptForImageSegmentation

checkpoint = CHECKPOINT
image_processor = SegGptImageProcessor.from_pretrained(checkpoint)
model = SegGptForImageSegmentation.from_pretrained(checkpoint)

# Number of labels in FoodSeg103 (not including background)
num_labels = 3

image_input = ds[4]["image"]
ground_truth = ds[4]["label"]
image_prompt = ds[29]["image"]
mask_prompt = ds[29]["label"]

inputs = image_processor(
    images=image_input,
    prompt_images=image_prompt,
    segmentation_maps=mask_prompt,
    num_labels=num_labels,
    return_tensors="pt"
)

with torch.no_grad():
    outputs = model(**inputs)

target_sizes = [image_input.size[::-1]]
mask = image_processor.post_process_semantic_segmentation(outputs, target_sizes, num_labels=num_labels)[0]
"""
OURS = "from seggpt_jax import SegGptImageProcessor, SegGptForImageSegmentation"
THEIRS = "from transformers import SegGptImageProcessor, SegGptForImageSegmentation"


@pytest.fixture(scope="module")
def checkpoint(hf_tiny, tmp_path_factory) -> str:
    """transformers' tiny checkpoint folder with transformers' preprocessor_config.json beside it."""
    hf, path = hf_tiny("nonsquare")
    folder = tmp_path_factory.mktemp("dropin") / "seggpt-tiny"
    shutil.copytree(path, folder)
    hf_processor_config(hf.config, str(folder))
    return str(folder)


def _picture(height: int, width: int, seed: int) -> Image.Image:
    """A smooth RGB picture with some texture (random weights see it like any photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), np.sin(4 * (x + y))], axis=-1) * 90 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _label_map(height: int, width: int, seed: int, num_labels: int = 3) -> Image.Image:
    """A FoodSeg103-like label image: mode L, class ids 0..num_labels in blobs."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_labels + 1, (4, 5)).astype(np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.NEAREST)


def _binary_mask(height: int, width: int, seed: int) -> Image.Image:
    """transformers' test data has L-mode 0/255 masks."""
    return _label_map(height, width, seed, num_labels=1).point(lambda v: 255 * v)


DATASET = {4: {"image": _picture(45, 70, 4), "label": _label_map(45, 70, 40)},
           29: {"image": _picture(60, 50, 29), "label": _label_map(60, 50, 290)}}


def _run(script: str, checkpoint: str) -> dict:
    namespace = {"ds": DATASET, "CHECKPOINT": checkpoint}
    exec(compile(script, "<model card>", "exec"), namespace)
    return namespace


def _numpy(value) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def test_the_model_card_example_with_only_the_imports_changed(checkpoint):
    assert THEIRS in CARD
    # transformers 5 refuses the card's segmentation_maps= (an older name); it runs under prompt_masks=.
    reference = _run(CARD.replace("segmentation_maps=", "prompt_masks="), checkpoint)
    assert type(reference["model"]) is transformers.SegGptForImageSegmentation
    for script in (CARD, CARD.replace("segmentation_maps=", "prompt_masks=")):
        ours = _run(script.replace(THEIRS, OURS), checkpoint)
        assert type(ours["model"]) is seggpt_jax.SegGptForImageSegmentation
        assert ours["image_processor"].size == QUERY_SIZE  # read from transformers' preprocessor_config.json
        for key, value in reference["inputs"].items():
            assert isinstance(ours["inputs"][key], torch.Tensor)
            np.testing.assert_array_equal(ours["inputs"][key].numpy(), value.numpy(), err_msg=key)
        assert max_abs(ours["outputs"].pred_masks, reference["outputs"].pred_masks) < 1e-4
        mask, expected = _numpy(ours["mask"]), reference["mask"].numpy()
        assert mask.shape == expected.shape == (45, 70) and mask.dtype == expected.dtype
        assert set(np.unique(expected)) > {0}  # the class map is not trivially constant
        np.testing.assert_array_equal(mask, expected)


# ------------------------------------------------------------------------ transformers' integration tests
# tests/models/seggpt/test_modeling_seggpt.py (SegGptModelIntegrationTest), with ``lib`` for the imports.
def prepare_img():
    images = [_picture(60, 80, 0), _picture(50, 50, 1), _picture(70, 40, 2)]
    masks = [_binary_mask(60, 80, 10), _binary_mask(50, 50, 11), _binary_mask(70, 40, 12)]
    return images, masks


def prepare_bool_masked_pos(config):
    num_patches = math.prod([i // config.patch_size for i in config.image_size])
    mask_ratio = 0.75
    torch.manual_seed(2)
    num_masked_patches = int(num_patches * mask_ratio)
    shuffle_idx = torch.randperm(num_patches)
    bool_masked_pos = torch.FloatTensor([0] * (num_patches - num_masked_patches) + [1] * num_masked_patches)[
        shuffle_idx]
    bool_masked_pos = bool_masked_pos.unsqueeze(0).bool()
    return bool_masked_pos


torch_device = "cpu"


def one_shot_inference(lib, checkpoint):
    model = lib.SegGptForImageSegmentation.from_pretrained(checkpoint)
    image_processor = lib.SegGptImageProcessor.from_pretrained(checkpoint)
    images, masks = prepare_img()
    input_image = images[1]
    prompt_image = images[0]
    prompt_mask = masks[0]
    inputs = image_processor(images=input_image, prompt_images=prompt_image, prompt_masks=prompt_mask,
                             return_tensors="pt")
    inputs = inputs.to(torch_device)
    with torch.no_grad():
        outputs = model(**inputs)
    result = image_processor.post_process_semantic_segmentation(outputs, [input_image.size[::-1]])[0]
    area = (result > 0).sum().item()
    return outputs.pred_masks, result, area


def few_shot_inference(lib, checkpoint):
    model = lib.SegGptForImageSegmentation.from_pretrained(checkpoint)
    image_processor = lib.SegGptImageProcessor.from_pretrained(checkpoint)
    images, masks = prepare_img()
    input_images = [images[1]] * 2
    prompt_images = [images[0], images[2]]
    prompt_masks = [masks[0], masks[2]]
    inputs = image_processor(images=input_images, prompt_images=prompt_images, prompt_masks=prompt_masks,
                             return_tensors="pt")
    inputs = {k: v.to(torch_device) for k, v in inputs.items()}
    with torch.no_grad():
        outputs = model(**inputs, feature_ensemble=True)
    return outputs.pred_masks


def one_shot_with_label(lib, checkpoint):
    model = lib.SegGptForImageSegmentation.from_pretrained(checkpoint)
    image_processor = lib.SegGptImageProcessor.from_pretrained(checkpoint)
    images, masks = prepare_img()
    input_image = images[1]
    label = masks[1]
    prompt_image = images[0]
    prompt_mask = masks[0]
    inputs = image_processor(images=input_image, prompt_masks=prompt_mask, prompt_images=prompt_image,
                             return_tensors="pt").to(torch_device)
    labels = image_processor(images=None, prompt_masks=label, return_tensors="pt")["prompt_masks"].to(torch_device)
    bool_masked_pos = prepare_bool_masked_pos(model.config)
    with torch.no_grad():
        outputs = model(**inputs, labels=labels, bool_masked_pos=bool_masked_pos)
    return outputs.loss, outputs.pred_masks


def test_one_shot_inference(checkpoint):
    pred, result, area = one_shot_inference(seggpt_jax, checkpoint)
    ref_pred, ref_result, ref_area = one_shot_inference(transformers, checkpoint)
    assert pred.shape == ref_pred.shape == (1, 3, 64, 32)
    assert max_abs(pred, ref_pred) < 1e-4
    assert _numpy(result).shape == (50, 50) and area == ref_area > 0
    # grey levels (no num_labels) are truncated to int: one pixel near a level boundary may land one apart
    levels, ref_levels = _numpy(result).astype(np.int64), ref_result.numpy()
    assert np.abs(levels - ref_levels).max() <= 1 and (levels == ref_levels).mean() >= 0.99


def test_few_shot_inference_with_feature_ensemble(checkpoint):
    pred = few_shot_inference(seggpt_jax, checkpoint)
    ref = few_shot_inference(transformers, checkpoint)
    assert pred.shape == ref.shape == (2, 3, 64, 32)
    assert max_abs(pred, ref) < 1e-4
    # the ensemble makes the two query halves alike but not equal: it did something
    assert float(np.abs(_numpy(ref)[0, :, 32:] - _numpy(ref)[1, :, 32:]).max()) > 1e-3


def test_one_shot_with_label_and_bool_masked_pos(checkpoint):
    loss, pred = one_shot_with_label(seggpt_jax, checkpoint)
    ref_loss, ref_pred = one_shot_with_label(transformers, checkpoint)
    assert max_abs(pred, ref_pred) < 1e-4
    assert abs(float(loss) - ref_loss.item()) <= 1e-6 * max(1.0, ref_loss.item())


# ------------------------------------------------------------------------ the processor's own files
def test_processor_from_a_hub_repo_id_offline(checkpoint, tmp_path):
    cache = str(tmp_path / "hub")
    fill_hub_cache(cache, "acme/seggpt-card", {name: os.path.join(checkpoint, name) for name in
                                               ("config.json", "model.safetensors", "preprocessor_config.json")})
    fill_hub_cache(cache, "acme/no-processor", {"config.json": os.path.join(checkpoint, "config.json")})
    code = """
        import json
        from seggpt_jax import SegGptImageProcessor
        print("CARD", json.dumps(SegGptImageProcessor.from_pretrained("acme/seggpt-card").to_dict()))
        print("NONE", json.dumps(SegGptImageProcessor.from_pretrained("acme/no-processor").to_dict()))
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    printed = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    with open(os.path.join(checkpoint, "preprocessor_config.json"), encoding="utf-8") as f:
        written_by_transformers = json.load(f)
    assert json.loads(printed["CARD"]) == written_by_transformers
    assert json.loads(printed["NONE"]) == seggpt_jax.SegGptImageProcessor().to_dict()


def test_saved_processor_round_trips_and_equals_transformers_reading_it(tmp_path, checkpoint):
    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    os.remove(folder / "preprocessor_config.json")
    config_before = (folder / "config.json").read_bytes()
    options = dict(size={"height": 24, "width": 40}, image_mean=[0.3, 0.5, 0.7], image_std=0.25,
                   do_normalize=False, resample=Image.BILINEAR, num_labels=3)
    seggpt_jax.SegGptImageProcessor(**options).save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert (folder / "config.json").read_bytes() == config_before

    ours = seggpt_jax.SegGptImageProcessor.from_pretrained(folder)
    theirs = HFProcessor.from_pretrained(folder)
    assert ours.to_dict() == json.loads((folder / "preprocessor_config.json").read_text())
    as_lists = {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.to_dict().items()}
    assert as_lists == ours.to_dict() == {**as_lists, **options, "image_std": [0.25] * 3}
    images, masks = prepare_img()
    for do_normalize in (None, True):  # the saved do_normalize=False, then the saved mean/std used per call
        got = ours(images=images[0], prompt_images=images[2], prompt_masks=DATASET[29]["label"],
                   do_normalize=do_normalize, return_tensors="np")
        want = theirs(images=images[0], prompt_images=images[2], prompt_masks=DATASET[29]["label"],
                      **({} if do_normalize is None else {"do_normalize": do_normalize}), return_tensors="np")
        for key in want:
            assert got[key].shape == (1, 3, 24, 40)
            np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=0, err_msg=key)


# ------------------------------------------------------------------------ the model's call, outputs and config
def test_model_takes_torch_numpy_and_jax_and_returns_transformers_tuples(hf_tiny):
    import jax.numpy as jnp
    from conftest import random_bool_masked_pos, random_inputs, to_torch

    hf_model, path = hf_tiny("nonsquare")
    model = seggpt_jax.SegGptForImageSegmentation.from_pretrained(path)
    assert model.eval() is model
    arrays = random_inputs(hf_model.config, batch=2, seed=3, labels=True)
    arrays["bool_masked_pos"] = random_bool_masked_pos(model.config.num_patches, batch=1, seed=3)
    torch_inputs = to_torch(arrays)  # the [1, N] mask over a batch of 2: transformers' loss quirk, kept
    with torch.no_grad():
        reference = hf_model(**torch_inputs, embedding_type="semantic", output_hidden_states=True)
        reference_tuple = hf_model(**torch_inputs, embedding_type="semantic", return_dict=False)
    assert len(reference_tuple) == 2  # (loss, pred_masks)
    with torch.no_grad():
        outputs = [model(**inputs, embedding_type="semantic", output_hidden_states=True)
                   for inputs in (torch_inputs, arrays, {k: jnp.asarray(v) for k, v in arrays.items()})]
    for out in outputs:
        np.testing.assert_array_equal(np.asarray(out.pred_masks), np.asarray(outputs[0].pred_masks))
        np.testing.assert_array_equal(np.asarray(out.loss), np.asarray(outputs[0].loss))
    out = outputs[0]
    assert max_abs(out.pred_masks, reference.pred_masks) < 1e-4
    assert abs(float(out["loss"]) - reference.loss.item()) <= 1e-6 * reference.loss.item()
    assert len(out.hidden_states) == len(reference.hidden_states)

    as_tuple = model(**torch_inputs, embedding_type="semantic", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(reference_tuple)
    loss, pred_masks = as_tuple
    assert max_abs(pred_masks, reference_tuple[1]) < 1e-4 and float(loss) == float(out.loss)
    full = out.to_tuple()  # (loss, pred_masks, hidden_states): transformers' fields in its order, None skipped
    assert len(full) == len(reference.to_tuple()) == 3 and full[1] is out.pred_masks and out[2] is out.hidden_states
    assert out[0] is out.loss and out["pred_masks"] is out.pred_masks
    without_labels = model(arrays["pixel_values"], arrays["prompt_pixel_values"], arrays["prompt_masks"],
                           return_dict=False)
    assert len(without_labels) == 1 and without_labels[0].shape == (2, 3, 64, 32)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(**torch_inputs, output_attentions=True)
    needing_grad = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in torch_inputs.items()}
    again = model(**needing_grad, embedding_type="semantic", output_attentions=False, feature_ensemble=None)
    np.testing.assert_array_equal(np.asarray(again.pred_masks), np.asarray(out.pred_masks))
    np.testing.assert_array_equal(np.asarray(model(**torch_inputs, embedding_type=None).pred_masks),
                                  np.asarray(model(**torch_inputs).pred_masks))  # None: "instance", as there


def test_encoder_tuple_is_transformers(hf_tiny):
    from conftest import random_inputs, to_torch

    hf_model, path = hf_tiny("nonsquare")
    encoder = seggpt_jax.SegGptModel.from_pretrained(path)
    hf_encoder = transformers.SegGptModel.from_pretrained(path).eval()
    inputs = to_torch(random_inputs(hf_model.config, batch=1, seed=4))
    with torch.no_grad():
        reference = hf_encoder(**inputs, output_hidden_states=True, return_dict=False)
    ours = encoder(**inputs, output_hidden_states=True, return_dict=False)
    assert len(ours) == len(reference) == 3  # last_hidden_state, hidden_states, intermediate_hidden_states
    assert max_abs(ours[0], reference[0]) < 1e-4
    assert [max_abs(a, b) < 1e-4 for a, b in zip(ours[2], reference[2])] == [True] * len(reference[2])
