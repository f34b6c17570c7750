"""Scanned layers held stacked (``RuntimeConfig(scan_layers=True)``): no stacked copy of the weights in
the forward, parity with transformers, the same checkpoint files in every layout, and every rule that
names layers (trainable regexes, layer-wise lr decay, training state) meaning the same layers."""

from __future__ import annotations

import filecmp
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import HFModel, max_abs, random_bool_masked_pos, random_inputs, to_torch
from flax import nnx
from test_train_state import _batches  # the same query size and patch grid as SMALL here

from seggpt_jax import RuntimeConfig, SegGptConfig, SegGptForImageSegmentation, SegGptModel
from seggpt_jax.nn import paths
from seggpt_jax.nn.inputs import prepare
from seggpt_jax.nn.models import _forward_jit
from seggpt_jax.train.trainer import Trainer, TrainConfig, check_trainable, frozen_layers
from seggpt_jax.weights import TRANSFORMERS, CheckpointError, flat_parameters, layer_parameters

SCAN = RuntimeConfig(scan_layers=True)
SMALL = SegGptConfig(image_size=(32, 16), patch_size=4, hidden_size=16, num_hidden_layers=5, num_attention_heads=2,
                     merge_index=1, intermediate_hidden_state_indices=(1, 4), pretrain_image_size=12,
                     decoder_hidden_size=4, drop_path_rate=0.0)  # stacks 0 (layer 0), 1 (1), 2 (2-4)


def _copy(params: dict) -> dict[str, np.ndarray]:
    return {key: np.array(value) for key, value in params.items()}


# ------------------------------------------------------------------------------------ the layout
def test_stack_paths_and_conversions():
    assert paths.layer_paths("model.encoder.stacks.3.mlp.lin1.kernel", 2) == [
        "model.encoder.layers.3.mlp.lin1.kernel", "model.encoder.layers.4.mlp.lin1.kernel"]
    assert paths.layer_paths("opt_state.0.mu.model.encoder.stacks.12.attention.qkv.kernel.value", 1) == [
        "opt_state.0.mu.model.encoder.layers.12.attention.qkv.kernel.value"]
    assert paths.layer_paths("encoder.stacks.0.attention.rel_pos_h", 1) == ["encoder.layers.0.attention.rel_pos_h"]
    for other in ("model.encoder.layers.3.mlp.lin1.kernel", "decoder.decoder_embed.kernel", "model.encoder.stacks"):
        assert paths.layer_paths(other, 4) == [other] and paths.stack_start(other) is None
    stacked = {"model.encoder.stacks.2.b": np.arange(6).reshape(3, 2), "decoder.a": np.ones(2)}
    rows = paths.per_layer(stacked)
    assert sorted(rows) == ["decoder.a", "model.encoder.layers.2.b", "model.encoder.layers.3.b",
                            "model.encoder.layers.4.b"]
    np.testing.assert_array_equal(rows["model.encoder.layers.3.b"], [2, 3])
    back = paths.stacked_like(rows, {k: v.shape for k, v in stacked.items()}, np.stack)
    assert all(np.array_equal(back[k], stacked[k]) for k in stacked)
    assert paths.row_index({k: v.shape for k, v in stacked.items()})["model.encoder.layers.4.b"] == (
        "model.encoder.stacks.2.b", 2)


@pytest.mark.parametrize("cls", [SegGptForImageSegmentation, SegGptModel])
def test_one_stack_per_segment_and_the_same_weights_from_a_seed(cls):
    vit = nnx.eval_shape(lambda: cls(SegGptConfig.vit_large(), runtime=SCAN, rngs=nnx.Rngs(0)))
    encoder = vit.model.encoder if cls is SegGptForImageSegmentation else vit.encoder
    assert not hasattr(encoder, "layers")
    assert {key: encoder.stacks[key].mlp.lin1.kernel.shape for key in encoder.stacks} == {
        "0": (2, 1024, 4096), "2": (1, 1024, 4096), "3": (3, 1024, 4096), "6": (6, 1024, 4096),
        "12": (6, 1024, 4096), "18": (6, 1024, 4096)}
    scanned, unscanned = cls(SMALL, runtime=SCAN, rngs=nnx.Rngs(4)), cls(SMALL, rngs=nnx.Rngs(4))
    ours, theirs = layer_parameters(scanned), layer_parameters(unscanned)
    assert ours.keys() == theirs.keys() and len(flat_parameters(scanned)) < len(flat_parameters(unscanned))
    assert all(np.array_equal(ours[key], theirs[key]) for key in ours)


def test_with_runtime_restacks_both_ways_and_refuses_to_share():
    model = SegGptForImageSegmentation(SMALL, rngs=nnx.Rngs(0))
    inputs = random_inputs(SMALL, batch=2, seed=5, labels=True)
    scanned = model.with_runtime(scan_layers=True)
    back = scanned.with_runtime(scan_layers=False)
    assert scanned.settings.runtime.scan_layers and not back.settings.runtime.scan_layers
    for other in (scanned, back):
        a, b = layer_parameters(other), layer_parameters(model)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    reference = np.asarray(model(**inputs).pred_masks)
    np.testing.assert_allclose(np.asarray(scanned(**inputs).pred_masks), reference, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(back(**inputs).pred_masks), reference)
    # the stacks are new arrays: training the scanned model leaves the original's layers alone
    scanned.model.encoder.stacks["2"].mlp.lin1.kernel[...] += 1.0
    np.testing.assert_array_equal(np.asarray(model(**inputs).pred_masks), reference)
    with pytest.raises(ValueError, match="shared=True needs the same parameter layout"):
        model.with_settings(shared=True, runtime=SCAN)
    assert scanned.with_settings(shared=True, dtype=jnp.bfloat16).model.encoder.stacks["2"] is not None


# ------------------------------------------------------------------------------------ memory
def test_the_scanned_vit_large_forward_allocates_no_stacked_copy_of_the_weights():
    """XLA's temporaries of the ViT-L forward (compiled for an abstract model, no weights) are those of
    the unscanned forward. Measured on this code: 205,521,920 bytes scanned, 205,522,424 unscanned
    (the forward that stacked the weights per call needed 1.216 GiB against 0.191 GiB). The margin,
    16 MiB, is a third of one layer's weights (48 MiB), so even one layer copied per scan step fails."""
    config = SegGptConfig.vit_large()
    zeros = np.zeros((1, config.num_channels, *config.query_size), np.float32)
    inputs, options = prepare(config, zeros, zeros, zeros)
    analyses, weights = {}, {}
    for scan in (False, True):
        abstract = nnx.eval_shape(lambda: SegGptForImageSegmentation(config, runtime=RuntimeConfig(scan_layers=scan),
                                                                      rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        analyses[scan] = _forward_jit.lower(graphdef, state, inputs, options).compile().memory_analysis()
        weights[scan] = sum(int(np.prod(v.shape)) * 4 for _, v in nnx.to_flat_state(state))
    stack_bytes = sum(int(np.prod(v.shape)) * 4 for _, v in nnx.to_flat_state(nnx.state(abstract.model.encoder.stacks)))
    assert weights[True] == weights[False] and stack_bytes > 2 ** 30  # 1.13 GB of layer weights in stacks
    assert analyses[True].argument_size_in_bytes == analyses[False].argument_size_in_bytes
    assert analyses[True].temp_size_in_bytes <= analyses[False].temp_size_in_bytes + 16 * 2 ** 20, (
        analyses[True].temp_size_in_bytes, analyses[False].temp_size_in_bytes)


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", ["nonsquare", "nonsquare_norel", "hf_test"])
def test_scanned_model_matches_transformers(hf_tiny, name):
    hf, path = hf_tiny(name)
    model = SegGptForImageSegmentation.from_pretrained(path, runtime=RuntimeConfig(attention="plain", scan_layers=True))
    assert hasattr(model.model.encoder, "stacks")
    inputs = random_inputs(model.config, batch=2, seed=11, labels=True)
    masked = random_bool_masked_pos(model.config.num_patches, batch=2, seed=12)
    ours = model(**inputs, bool_masked_pos=masked, output_hidden_states=True)
    with torch.no_grad():
        ref = hf(**to_torch(inputs), bool_masked_pos=torch.from_numpy(masked), output_hidden_states=True)
    errors = {f"hidden {i}": max_abs(a, b) for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states))}
    errors.update(pred_masks=max_abs(ours.pred_masks, ref.pred_masks), loss=abs(float(ours.loss) - float(ref.loss)))
    assert len(ours.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    assert max(errors.values()) <= 1e-5, errors
    assert float(np.abs(np.asarray(ours.pred_masks)).max()) > 0.05


def test_scanned_rematerialised_gradients_match_transformers_autograd(hf_tiny):
    hf, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path, runtime=RuntimeConfig(scan_layers=True,
                                                                                   remat_policy="dots"))
    inputs = random_inputs(model.config, batch=2, seed=14, labels=True)
    masked = random_bool_masked_pos(model.config.num_patches, batch=2, seed=15)
    hf.zero_grad(set_to_none=True)
    hf(**to_torch(inputs), bool_masked_pos=torch.from_numpy(masked)).loss.backward()
    grads = layer_parameters(nnx.grad(lambda m: m(**inputs, bool_masked_pos=masked).loss)(model))
    assert any(".stacks." in path for path in flat_parameters(model))
    worst = 0.0
    for hf_name, param in hf.named_parameters():
        target, transform = TRANSFORMERS.match(hf_name)
        theirs = param.grad.numpy() if param.grad is not None else np.zeros(param.shape, np.float32)
        worst = max(worst, float(np.max(np.abs(transform.invert(np.asarray(grads.pop(target))) - theirs))))
    hf.zero_grad(set_to_none=True)
    assert not grads and 0 < worst <= 1e-5, worst  # every parameter compared, none all zero


# ------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("layout", ["seggpt-jax", "transformers", "original"])
def test_checkpoints_are_the_same_files_scanned_or_not(hf_tiny, tmp_path, layout):
    hf, path = hf_tiny("nonsquare")
    unscanned = SegGptForImageSegmentation.from_pretrained(path)
    scanned = SegGptForImageSegmentation.from_pretrained(path, runtime=SCAN)
    reference = _copy(layer_parameters(unscanned))
    for name, model in (("unscanned", unscanned), ("scanned", scanned)):
        model.save_pretrained(tmp_path / name, layout=layout)
    files = sorted(os.listdir(tmp_path / "unscanned"))
    assert files == sorted(os.listdir(tmp_path / "scanned"))
    for file in files:  # byte for byte
        assert filecmp.cmp(tmp_path / "unscanned" / file, tmp_path / "scanned" / file, shallow=False), file
    for source in ("unscanned", "scanned"):
        for runtime in (None, SCAN):
            loaded = layer_parameters(SegGptForImageSegmentation.from_pretrained(tmp_path / source, runtime=runtime))
            assert loaded.keys() == reference.keys()
            for key, value in loaded.items():
                np.testing.assert_array_equal(np.asarray(value), reference[key], err_msg=f"{source} {runtime} {key}")
    if layout == "transformers":  # transformers loads the scanned model's save and computes the same
        loaded, info = HFModel.from_pretrained(tmp_path / "scanned", output_loading_info=True)
        assert not any(info.values()), info
        inputs = random_inputs(scanned.config, batch=1, seed=13)
        with torch.no_grad():
            theirs = loaded.eval()(**to_torch(inputs)).pred_masks
        assert max_abs(scanned(**inputs).pred_masks, theirs) <= 1e-5


def test_scanned_encoder_alone_loads_and_saves(hf_tiny, tmp_path):
    _, path = hf_tiny("nonsquare")
    encoder = SegGptModel.from_pretrained(path, runtime=SCAN)
    encoder.save_pretrained(tmp_path / "scanned", layout="transformers")
    SegGptModel.from_pretrained(path).save_pretrained(tmp_path / "unscanned", layout="transformers")
    assert filecmp.cmp(tmp_path / "scanned" / "model.safetensors", tmp_path / "unscanned" / "model.safetensors",
                       shallow=False)


def test_checkpoint_problems_are_named_per_layer_for_a_scanned_model(hf_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    hf, path = hf_tiny("nonsquare")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.encoder.layers.4.mlp.lin1.bias"]
    tensors["model.encoder.layers.3.attention.rel_pos_h"] = torch.zeros(7, 8)
    folder = tmp_path / "broken"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        (folder / "config.json").write_text(f.read())
    with pytest.raises(CheckpointError) as e:
        SegGptForImageSegmentation.from_pretrained(folder, runtime=SCAN)
    message = str(e.value)
    assert "parameters missing from the checkpoint (1):\n    model.encoder.layers.4.mlp.lin1.bias" in message
    assert "model.encoder.layers.3.attention.rel_pos_h: checkpoint has (7, 8), model expects (31, 8)" in message
    assert "stacks" not in message


# ------------------------------------------------------------------------------------ training
def _layer(key: str) -> str:
    return key.split(".")[3] if ".layers." in key else key.split(".")[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same training run (a regex over some layers of the last stack and the decoder, layer-wise lr
    decay, gradient clipping, weight decay), unscanned and scanned, checkpointed."""
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=0, learning_rate=1e-2, layer_decay=0.7, grad_clip=1.0,
                         trainable=r"encoder\.layers\.[23]\.|^decoder\.", checkpoint_every=2, drop_path=False)
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for scan in (False, True):
        model = SegGptForImageSegmentation(SMALL, runtime=RuntimeConfig(scan_layers=scan), rngs=nnx.Rngs(0))
        before = _copy(layer_parameters(model))
        trainer = Trainer(model, config, batches=_batches)
        trainer.fit(checkpoint_dir=str(root / str(scan)))
        runs[scan] = (before, _copy(layer_parameters(model)), str(root / str(scan)))
    return config, runs


def test_trainer_rules_mean_the_same_layers_on_a_scanned_model(trained):
    config, runs = trained
    (before, plain, _), (scanned_before, scanned, _) = runs[False], runs[True]
    assert all(np.array_equal(before[k], scanned_before[k]) for k in before)
    changed = {_layer(k) for k in before if not np.array_equal(before[k], plain[k])}
    assert changed == {"2", "3", "decoder"}  # the regex's layers, whatever the layout
    for key in before:
        if _layer(key) in ("2", "3", "decoder"):  # trained alike: same lr decay per layer, same weight decay
            np.testing.assert_allclose(scanned[key], plain[key], rtol=1e-5, atol=1e-6, err_msg=key)
        else:  # layer 4 shares a stack with the trained 2 and 3 and stays exactly as it was
            np.testing.assert_array_equal(scanned[key], before[key], err_msg=key)
    model = SegGptForImageSegmentation(SMALL, runtime=SCAN, rngs=nnx.Rngs(0))
    assert frozen_layers(model, config.trainable) == {
        n for n in layer_parameters(model) if n.startswith("model.encoder.layers.4.")}
    assert frozen_layers(SegGptForImageSegmentation(SMALL, rngs=nnx.Rngs(0)), config.trainable) == set()
    with pytest.raises(ValueError, match=r"regex searched in the per-layer parameter paths.*model\.encoder\.layers\.0"):
        check_trainable(SMALL, r"encoder\.stacks")


def test_training_checkpoints_are_the_same_files_and_resume_in_either_layout(trained):
    from safetensors import safe_open

    config, runs = trained
    files = {}
    for scan in (False, True):
        with safe_open(os.path.join(runs[scan][2], "step_0000002", "optimizer.safetensors"), "numpy") as f:
            files[scan] = {key: f.get_tensor(key) for key in f.keys()}
    assert files[False].keys() == files[True].keys()
    assert not any(".stacks." in key or ".layers.4." in key for key in files[True])  # frozen rows left out
    for key, value in files[False].items():
        np.testing.assert_allclose(files[True][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    longer = TrainConfig(**{**config.to_json(), "betas": tuple(config.betas), "steps": 3})
    results = {}
    for source in (False, True):
        for scan in (False, True):
            trainer = Trainer.restore(runs[source][2], batches=_batches, config=longer,
                                      runtime=RuntimeConfig(scan_layers=scan))
            assert trainer.step_count == 2 and hasattr(trainer.model.model.encoder, "stacks") == scan
            trainer.fit()
            results[(source, scan)] = _copy(layer_parameters(trainer.model))
    reference = results[(False, False)]
    for case, params in results.items():
        for key, value in params.items():
            if _layer(key) == "4":
                np.testing.assert_array_equal(value, runs[False][0][key], err_msg=f"{case} {key}")
            np.testing.assert_allclose(value, reference[key], rtol=1e-5, atol=1e-6, err_msg=f"{case} {key}")


def test_scanned_bfloat16_remat_training_step_runs():
    model = SegGptForImageSegmentation(SMALL, runtime=SCAN, rngs=nnx.Rngs(0))
    trainer = Trainer(model, TrainConfig(steps=1, batch_size=2, dtype="bfloat16", remat_policy="dots", warmup_steps=0,
                                         trainable=r"encoder\.layers\.[34]\."), batches=_batches)
    before = _copy(layer_parameters(model))
    history = trainer.fit()
    after = layer_parameters(model)
    assert np.isfinite(history[-1]["loss"])
    assert {_layer(k) for k in before if not np.array_equal(before[k], np.asarray(after[k]))} == {"3", "4"}
    assert all(v[...].dtype == jnp.float32 for v in flat_parameters(model).values())
    assert jax.tree.leaves(nnx.state(trainer.model.model.encoder.stacks))[0].shape[0] in (1, 3)
