"""``python convert/convert_seggpt_checkpoint.py`` and ``seggpt-jax convert|info``: results, reports, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_CONFIGS

from seggpt_jax import SegGptForImageSegmentation
from seggpt_jax.weights import flat_parameters
from seggpt_jax.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "seggpt-jax")


def _same_parameters(a_path, b_path):
    a = flat_parameters(SegGptForImageSegmentation.from_pretrained(a_path))
    b = flat_parameters(SegGptForImageSegmentation.from_pretrained(b_path))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key][...]), np.asarray(b[key][...]), err_msg=key)


@pytest.mark.parametrize("entry", ["convert script", "seggpt-jax convert"])
def test_conversion_entry_points(hf_tiny, tmp_path, entry):
    _, src = hf_tiny("nonsquare")
    out = tmp_path / "converted"
    command = {"convert script": [sys.executable, os.path.join("convert", "convert_seggpt_checkpoint.py")],
               "seggpt-jax convert": [CONSOLE_SCRIPT, "convert"]}[entry]
    result = subprocess.run([*command, src, "--out-dir", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "reload is bit-identical" in result.stdout
    assert "parity against transformers (read by transformers from SRC" in result.stdout
    assert "parity OK: pred_masks max abs error" in result.stdout
    assert "checking that it reloads" in result.stderr and "parity against transformers on random inputs" in \
        result.stderr  # it says what it is doing, and how long the parity check takes
    assert sorted(os.listdir(out)) == [".seggpt-jax-outputs.jsonl", "config.json", "model.safetensors"]
    _same_parameters(src, out)


def test_convert_original_pth_reports_parity_through_transformers(hf_tiny, tmp_path, capsys):
    _, src = hf_tiny("nonsquare", "original")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIGS["nonsquare"]))
    assert main(["convert", src, "--out-dir", str(tmp_path / "out"), "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "our weights exported to transformers" in printed and "parity OK" in printed
    _same_parameters(hf_tiny("nonsquare")[1], tmp_path / "out")


def test_convert_reports_parity_for_a_grid_with_odd_rows(hf_tiny, tmp_path, capsys):
    """transformers' own test config has 15 patch rows: no feature-ensemble case, but a full report."""
    _, src = hf_tiny("hf_test")
    assert main(["convert", src, "--out-dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "parity OK" in printed and "ensemble" not in printed and "semantic + labels" in printed


def test_convert_to_bfloat16_without_parity(hf_tiny, tmp_path, capsys):
    _, src = hf_tiny("nonsquare", "bin")
    assert main(["convert", src, "--out-dir", str(tmp_path / "out"), "--dtype", "bfloat16", "--no-parity"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "numpy") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"bfloat16"}
    model = SegGptForImageSegmentation.from_pretrained(tmp_path / "out")  # float32 parameters by default
    assert str(next(iter(flat_parameters(model).values()))[...].dtype) == "float32"


def test_convert_errors_are_one_clear_line_and_leave_nothing_behind(hf_tiny, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "out")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("seggpt-jax: ")]
    assert len(errors) == 1 and errors[0].startswith("seggpt-jax convert: error: no such file or directory:")

    _, src = hf_tiny("nonsquare")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert main(["convert", str(broken), "--out-dir", str(tmp_path / "out")]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing is created before the checkpoint has been read

    (tmp_path / "file").write_text("not a folder")
    assert main(["convert", src, "--out-dir", str(tmp_path / "file"), "--no-parity"]) == 1
    assert "--out-dir " + str(tmp_path / "file") + " exists and is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "foreign object"])
def test_a_corrupt_pth_gets_our_message_never_advice_to_unpickle(tmp_path, capsys, damage):
    import torch

    path = tmp_path / "seggpt_vit_large.pth"
    if damage == "truncated":
        torch.save({"model": {"pos_embed": torch.zeros(1, 197, 8)}}, path)
        path.write_bytes(path.read_bytes()[:200])
        reason = "truncated or corrupt"
    else:
        import fractions

        torch.save({"model": {"pos_embed": torch.zeros(1, 197, 8)}, "scale": fractions.Fraction(1, 3)}, path)
        reason = "it holds a Python object (fractions.Fraction) besides tensors"
    assert main(["info", str(path)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and reason in errors[0] and "weights_only" not in errors[0], errors


def test_convert_overwrite_replaces_only_its_own_files(hf_tiny, tmp_path, capsys):
    _, src = hf_tiny("nonsquare")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    (busy / "notes").mkdir()
    (busy / "notes" / "a.txt").write_text("also mine")
    assert main(["convert", src, "--out-dir", str(busy), "--no-parity"]) == 0  # beside unrelated files
    assert main(["convert", src, "--out-dir", str(busy), "--no-parity"]) == 1  # its own files: only with --overwrite
    assert "config.json exists (written by an earlier run); pass --overwrite" in capsys.readouterr().err
    assert main(["convert", src, "--out-dir", str(busy), "--no-parity", "--overwrite"]) == 0
    assert (busy / "keep.txt").read_text() == "mine" and (busy / "notes" / "a.txt").read_text() == "also mine"
    _same_parameters(src, busy)

    (busy / "config.json").write_text("{}")  # the user's own file under a name convert writes: never replaced
    assert main(["convert", src, "--out-dir", str(busy), "--no-parity", "--overwrite"]) == 1
    assert "config.json exists and was not written by seggpt-jax" in capsys.readouterr().err
    assert (busy / "config.json").read_text() == "{}" and (busy / "keep.txt").read_text() == "mine"


def test_info(hf_tiny, capsys):
    _, src = hf_tiny("nonsquare")
    assert main(["info", src]) == 0
    printed = capsys.readouterr().out
    assert "M parameters, float32, hidden 32 x 6 layers, canvas 64x32, device" in printed
    assert '"merge_index": 2' in printed


@pytest.mark.parametrize("command", [["--help"], ["convert", "--help"], ["info", "--help"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 0
    assert "usage: seggpt-jax" in capsys.readouterr().out
