"""Every checkpoint layout loads to the same model; every broken checkpoint fails with a clear error."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, max_abs, random_inputs, to_torch
from safetensors.torch import load_file as load_torch_safetensors
from safetensors.torch import save_file as save_torch_safetensors

from seggpt_jax import (CheckpointError, ConfigError, ModelNotFoundError, SegGptConfig, SegGptForImageSegmentation,
                        SegGptModel)
from seggpt_jax.weights import flat_parameters


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in flat_parameters(model).items()}


@pytest.fixture(scope="module")
def reference(hf_tiny):
    """Parameters of the nonsquare model as loaded from transformers' safetensors."""
    _, path = hf_tiny("nonsquare")
    return _params(SegGptForImageSegmentation.from_pretrained(path))


@pytest.mark.parametrize("fmt", ["bin", "sharded-safetensors", "sharded-bin"])
def test_transformers_layouts_load_identically(hf_tiny, reference, fmt):
    _, path = hf_tiny("nonsquare", fmt)
    params = _params(SegGptForImageSegmentation.from_pretrained(path))
    assert params.keys() == reference.keys()
    for key, value in params.items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)


def test_original_baai_pth_gives_the_same_outputs(hf_tiny, reference):
    hf, path = hf_tiny("nonsquare", "original")
    config = SegGptConfig.from_dict(TINY_CONFIGS["nonsquare"])
    model = SegGptForImageSegmentation.from_pretrained(path, config=config)
    for key, value in _params(model).items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
    inputs = random_inputs(config, batch=2, seed=21)
    with torch.no_grad():
        ref = hf(**to_torch(inputs))
    assert max_abs(model(**inputs).pred_masks, ref.pred_masks) <= 1e-5


def test_original_pth_without_config_assumes_vit_large_and_says_what_does_not_fit(hf_tiny):
    _, path = hf_tiny("nonsquare", "original")
    with pytest.raises(CheckpointError) as err:
        SegGptForImageSegmentation.from_pretrained(path)
    message = str(err.value)
    assert "original layout" in message and "shape mismatches" in message and "default ViT-L config" in message
    assert "patch_embed.proj.weight" in message and "blocks.0.attn.qkv.weight" in message


def test_save_pretrained_round_trips_exactly(hf_tiny, reference, tmp_path):
    _, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path)
    model.save_pretrained(tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "model.safetensors"]
    again = SegGptForImageSegmentation.from_pretrained(tmp_path / "ours")
    assert again.config == model.config
    for key, value in _params(again).items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
    inputs = random_inputs(model.config, batch=1, seed=22)
    np.testing.assert_array_equal(np.asarray(again(**inputs).pred_masks), np.asarray(model(**inputs).pred_masks))
    # the config.json we write is a transformers config too
    from transformers import SegGptConfig as HFConfig

    hf_config = HFConfig.from_pretrained(tmp_path / "ours")
    assert hf_config.merge_index == 2 and list(hf_config.image_size) == [64, 32]
    # a lone weight file carries its config in the safetensors metadata
    alone = tmp_path / "alone.safetensors"
    shutil.copy(tmp_path / "ours" / "model.safetensors", alone)
    assert SegGptForImageSegmentation.from_pretrained(alone).config == model.config


def test_bfloat16_parameters_round_trip(hf_tiny, reference, tmp_path):
    _, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    params = _params(model)
    assert all(v.dtype == jnp.bfloat16 for v in params.values())
    model.save_pretrained(tmp_path)
    again = SegGptForImageSegmentation.from_pretrained(tmp_path, param_dtype=jnp.bfloat16)
    for key, value in _params(again).items():
        np.testing.assert_array_equal(value, params[key], err_msg=key)


def test_encoder_loads_from_painter_checkpoints_and_back(hf_tiny, tmp_path):
    _, path = hf_tiny("nonsquare")
    painter = SegGptForImageSegmentation.from_pretrained(path)
    encoder = SegGptModel.from_pretrained(path)
    painter_encoder = _params(painter.model)
    for key, value in _params(encoder).items():
        np.testing.assert_array_equal(value, painter_encoder[key], err_msg=key)
    encoder.save_pretrained(tmp_path / "encoder")
    assert _params(SegGptModel.from_pretrained(tmp_path / "encoder")).keys() == painter_encoder.keys()
    with pytest.raises(CheckpointError, match=r"parameters missing from the checkpoint[\s\S]*decoder\.decoder_embed"):
        SegGptForImageSegmentation.from_pretrained(tmp_path / "encoder")


def _doctored(hf_tiny, tmp_path, edit) -> str:
    """A copy of the nonsquare transformers checkpoint with its tensors edited."""
    _, path = hf_tiny("nonsquare")
    folder = tmp_path / "doctored"
    shutil.copytree(path, folder)
    tensors = load_torch_safetensors(folder / "model.safetensors")
    edit(tensors)
    save_torch_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def test_all_problems_are_reported_together(hf_tiny, tmp_path):
    def edit(t):
        del t["model.encoder.layers.3.mlp.lin1.bias"]
        del t["decoder.decoder_pred.head.weight"]
        t["model.encoder.layers.0.extra.weight"] = torch.zeros(3)
        t["model.encoder.layers.1.attention.rel_pos_h"] = torch.zeros(7, 8)
        t["model.encoder.layers.2.attention.qkv.weight"] = torch.zeros(96, 32, 1)
        t["model.embeddings.mask_token"] = torch.full((1, 1, 1, 32), float("nan"))
        t["model.encoder.layers.4.mlp.lin2.bias"] = torch.zeros(32, dtype=torch.int32)

    with pytest.raises(CheckpointError) as err:
        SegGptForImageSegmentation.from_pretrained(_doctored(hf_tiny, tmp_path, edit))
    message = str(err.value)
    for expected in [
        "parameters missing from the checkpoint (2)", "model.encoder.layers.3.mlp.lin1.bias",
        "decoder.decoder_pred.head.kernel",
        "checkpoint tensors this model does not use (1)", "model.encoder.layers.0.extra.weight",
        "shape mismatches (2)", "model.encoder.layers.1.attention.rel_pos_h: checkpoint has (7, 8), model expects (31, 8)",
        "model.encoder.layers.2.attention.qkv.weight",
        "unusable values (2)", "mask_token: contains NaN", "lin2.bias: dtype int32 is not floating point",
    ]:
        assert expected in message, f"{expected!r} not in:\n{message}"


def test_checkpoint_for_another_config_is_refused_with_names(hf_tiny, tmp_path):
    _, path = hf_tiny("nonsquare")
    folder = tmp_path / "wrong-config"
    shutil.copytree(path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 4
    config["intermediate_hidden_state_indices"] = [2, 3]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        SegGptForImageSegmentation.from_pretrained(folder)
    message = str(err.value)
    assert "model.encoder.layers.5.mlp.lin1.weight (-> model.encoder.layers.5.mlp.lin1.kernel: no such parameter" \
        in message
    assert "decoder.decoder_embed.weight: checkpoint has (128, 96), model expects (128, 64)" in message
    assert f"built from {folder / 'config.json'}" in message


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "original"])
def test_truncated_files_are_named(hf_tiny, tmp_path, fmt):
    _, path = hf_tiny("nonsquare", fmt)
    weights = path if os.path.isfile(path) else os.path.join(
        path, "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    copy = tmp_path / os.path.basename(weights)
    data = open(weights, "rb").read()
    copy.write_bytes(data[: len(data) // 2])
    if fmt != "original":
        shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    config = SegGptConfig.from_dict(TINY_CONFIGS["nonsquare"])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        SegGptForImageSegmentation.from_pretrained(tmp_path if fmt != "original" else copy, config=config)
    assert os.path.basename(weights) in str(err.value)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_garbage_files_are_named(hf_tiny, tmp_path, name):
    _, path = hf_tiny("nonsquare")
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    (tmp_path / name).write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=f"{name}: not a readable"):
        SegGptForImageSegmentation.from_pretrained(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors: file is empty"):
        SegGptForImageSegmentation.from_pretrained(tmp_path)


def test_folder_problems(hf_tiny, tmp_path):
    with pytest.raises(CheckpointError, match=r"no weights found; expected one of .*model\.safetensors"):
        SegGptForImageSegmentation.from_pretrained(tmp_path)
    _, path = hf_tiny("nonsquare")
    shutil.copy(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="has model.safetensors but no config.json"):
        SegGptForImageSegmentation.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        SegGptForImageSegmentation.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIGS["nonsquare"], "merge_index": 5}))
    with pytest.raises(CheckpointError, match=r"config.json: merge_index \(5\) must not exceed the first decoder tap"):
        SegGptForImageSegmentation.from_pretrained(tmp_path)
    assert issubclass(CheckpointError, ValueError) and issubclass(ConfigError, ValueError)
    with pytest.raises(CheckpointError):
        SegGptForImageSegmentation.from_pretrained(tmp_path)


def test_unknown_layout_is_refused(tmp_path):
    save_torch_safetensors({"foo.bar": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIGS["nonsquare"]))
    with pytest.raises(CheckpointError, match=r"cannot tell the checkpoint layout .*foo\.bar"):
        SegGptForImageSegmentation.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="layout must be one of"):
        SegGptForImageSegmentation.from_pretrained(tmp_path, layout="keras")


def test_missing_paths_and_bad_names():
    with pytest.raises(ModelNotFoundError, match="no such file or directory: /nonexistent/seggpt"):
        SegGptForImageSegmentation.from_pretrained("/nonexistent/seggpt")
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        SegGptForImageSegmentation.from_pretrained("weights/seggpt_vit_large.pth")
    with pytest.raises(ModelNotFoundError, match="neither an existing local path nor a Hugging Face repo id"):
        SegGptForImageSegmentation.from_pretrained("not a repo id!")


def test_read_safetensors_returns_what_was_written_and_names_broken_files(tmp_path):
    """The one safetensors reader (the library's, pread backend): every dtype and edge shape, and errors."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from seggpt_jax.weights import read_safetensors

    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f64": rng.standard_normal((2,)),
        "f16": rng.standard_normal((4, 1, 2)).astype(np.float16),
        "bf16": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(5, dtype=np.uint8),
        "bool": np.array([True, False]),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"note": "hello"})
    arrays, metadata = read_safetensors(path)
    assert metadata == {"note": "hello"} and sorted(arrays) == sorted(tensors)
    for key, value in tensors.items():
        assert arrays[key].dtype == value.dtype and arrays[key].shape == value.shape, key
        np.testing.assert_array_equal(arrays[key], value, err_msg=key)
    data = path.read_bytes()
    broken = {"cut": data[:-3], "header": (10 ** 12).to_bytes(8, "little") + b"{}", "garbage": os.urandom(4096)}
    for name, content in broken.items():
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"{name}\.safetensors: not a readable safetensors file"):
            read_safetensors(tmp_path / f"{name}.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*absent.safetensors"):
        read_safetensors(tmp_path / "absent.safetensors")
