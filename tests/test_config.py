"""SegGptConfig: transformers' field names and defaults, config.json both ways, invalid combinations."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import SegGptConfig as HFConfig

from seggpt_jax import ConfigError, SegGptConfig


def _normalise(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def test_fields_and_defaults_match_transformers():
    ours, theirs = SegGptConfig(), HFConfig()
    for field in dataclasses.fields(SegGptConfig):
        assert hasattr(theirs, field.name), field.name
        assert _normalise(getattr(ours, field.name)) == _normalise(getattr(theirs, field.name)), field.name
    assert ours.grid_size == (56, 28) and ours.mlp_dim == 4096 and ours.intermediate_hidden_state_indices == (5, 11, 17, 23)
    hash(ours)  # static data for jit: must be hashable


def test_reads_transformers_config_json_and_ignores_unknown_keys(tmp_path):
    HFConfig(image_size=[64, 32], patch_size=4, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
             merge_index=2, intermediate_hidden_state_indices=[2, 4, 5], mlp_ratio=2.0).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert "transformers_version" in data and "mlp_ratio" in data  # keys we do not model
    config = SegGptConfig.from_json_file(tmp_path / "config.json")
    assert config.image_size == (64, 32) and config.intermediate_hidden_state_indices == (2, 4, 5)
    assert config.mlp_dim == 128


def test_written_config_reads_back_here_and_in_transformers(tmp_path):
    config = SegGptConfig(image_size=(64, 32), patch_size=4, hidden_size=32, num_hidden_layers=6,
                          num_attention_heads=4, intermediate_hidden_state_indices=(2, 4, 5), beta=0.5)
    config.to_json_file(tmp_path / "config.json")
    assert SegGptConfig.from_json_file(tmp_path / "config.json") == config
    theirs = HFConfig.from_pretrained(tmp_path)
    for field in dataclasses.fields(SegGptConfig):
        assert _normalise(getattr(theirs, field.name)) == _normalise(getattr(config, field.name)), field.name


def test_int_image_size_is_a_square_canvas():
    assert SegGptConfig(image_size=30, patch_size=2, merge_index=0, intermediate_hidden_state_indices=[1],
                        num_hidden_layers=2).grid_size == (15, 15)


@pytest.mark.parametrize("changes, message", [
    (dict(merge_index=6), r"merge_index \(6\) must not exceed the first decoder tap \(5\)"),
    (dict(merge_index=30, intermediate_hidden_state_indices=[23]), r"merge_index \(30\) must be a layer index"),
    (dict(hidden_size=1000), r"hidden_size \(1000\) must be divisible by num_attention_heads \(16\)"),
    (dict(image_size=(890, 448)), r"image_size \(890, 448\) must be divisible by patch_size \(16\)"),
    (dict(image_size=(21, 14), patch_size=7), r"image_size height \(21\) must be even"),
    (dict(intermediate_hidden_state_indices=[5, 24]), r"\[24\] are outside the 24 encoder layers"),
    (dict(intermediate_hidden_state_indices=[5, 5, 11]), r"has duplicates: \[5, 5, 11\]"),
    (dict(intermediate_hidden_state_indices=[]), r"must name at least one layer"),
    (dict(hidden_size="1024"), r"hidden_size must be a positive integer, got '1024'"),
    (dict(num_hidden_layers=0), r"num_hidden_layers must be a positive integer, got 0"),
    (dict(hidden_act="mish"), r"hidden_act='mish' is not supported"),
    (dict(layer_norm_eps=0.0), r"layer_norm_eps must be > 0"),
    (dict(image_size=(896, 448, 3)), r"image_size must be an integer or a pair"),
    (dict(patch_size=(16, 8)), r"patch_size must be square"),
    (dict(qkv_bias="yes"), r"qkv_bias must be true or false"),
])
def test_invalid_configs_are_rejected_with_a_message(changes, message):
    with pytest.raises(ConfigError, match=message):
        SegGptConfig(**changes)


def test_from_dict_names_the_source_and_checks_model_type():
    with pytest.raises(ConfigError, match=r"invalid config in my.json: merge_index"):
        SegGptConfig.from_dict({"merge_index": 9}, source="my.json")
    with pytest.raises(ConfigError, match="model_type='vit'"):
        SegGptConfig.from_dict({"model_type": "vit"})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        SegGptConfig.from_dict([1, 2])


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SegGptConfig().hidden_size = 8
    assert SegGptConfig().replace(beta=0.5).beta == 0.5


def test_from_pretrained_reads_folders_files_and_names_what_is_missing(tmp_path):
    from seggpt_jax import ModelNotFoundError

    written = dict(image_size=[64, 32], patch_size=4, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                   merge_index=2, intermediate_hidden_state_indices=[2, 4, 5], beta=0.5)
    HFConfig(**written).save_pretrained(tmp_path / "folder")
    (tmp_path / "folder" / "seggpt_vit_large.pth").write_bytes(b"weights beside the config")
    (tmp_path / "tiny.json").write_text((tmp_path / "folder" / "config.json").read_text())
    for source in (tmp_path / "folder", tmp_path / "folder" / "config.json", tmp_path / "tiny.json",
                   tmp_path / "folder" / "seggpt_vit_large.pth", str(tmp_path / "folder")):
        config = SegGptConfig.from_pretrained(source)
        for field, value in written.items():
            assert _normalise(getattr(config, field)) == _normalise(value), (source, field)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"empty: no config\.json in this folder"):
        SegGptConfig.from_pretrained(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        SegGptConfig.from_pretrained(tmp_path / "missing")
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(ConfigError, match=r"broken\.json is not valid JSON"):
        SegGptConfig.from_pretrained(tmp_path / "broken.json")
    (tmp_path / "vit.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ConfigError, match=r"vit\.json has model_type='vit'"):
        SegGptConfig.from_pretrained(tmp_path / "vit.json")
