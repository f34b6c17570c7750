"""``seggpt-jax finetune``, ``tune-prompt``, ``evaluate`` and ``segment --learned-prompt`` end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from seggpt_jax import SegGptForImageSegmentation
from seggpt_jax.weights import flat_parameters
from seggpt_jax.cli import main
from seggpt_jax_testing.synthetic import write_synthetic_fss, write_synthetic_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return dict(fss=write_synthetic_fss(root / "fss", 4, colours=("red", "blue"), size=(32, 32)),
                folder=write_synthetic_folder(root / "folder", 6, size=(32, 32)))


def _params(path):
    return {k: np.asarray(v[...]) for k, v in flat_parameters(SegGptForImageSegmentation.from_pretrained(path)).items()}


def test_finetune_resume_and_report(hf_tiny, data, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    run = str(tmp_path / "run")
    common = ["finetune", data["fss"], "--data-layout", "fss1000", "--model", model, "--out-dir", run,
              "--batch-size", "2", "--warmup-steps", "1", "--checkpoint-every", "2", "--log-every", "2"]
    assert main(common + ["--steps", "6", "--stop-after", "4"]) == 0  # an interrupted run
    out = capsys.readouterr().out
    assert "step 2  loss" in out and "stopped at step 4 of 6; continue with --resume" in out
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_0000004"
    assert main(common + ["--steps", "6"]) == 1  # refuses to overwrite a run
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(common + ["--steps", "6", "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resumed" in captured.err and "fine-tuned 6 steps" in captured.out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 6 and report["samples"] == 8 and np.isfinite(report["final_loss"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    straight = str(tmp_path / "straight")
    assert main([*common[:-10], "--out-dir", straight, "--batch-size", "2", "--warmup-steps", "1",
                 "--checkpoint-every", "2", "--log-every", "2", "--steps", "6"]) == 0
    a, b = _params(os.path.join(run, "final")), _params(os.path.join(straight, "final"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_finetune_refuses_bad_data_before_training(hf_tiny, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(root / "masks" / "a.png")
    code = main(["finetune", str(root), "--num-labels", "3", "--model", model, "--out-dir",
                 str(tmp_path / "run"), "--steps", "2"])
    assert code == 1
    assert "class ids above num_labels=3" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_tune_prompt_then_segment_and_evaluate_with_it(hf_tiny, data, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    prompt = str(tmp_path / "prompt.safetensors")
    assert main(["tune-prompt", data["folder"], "--model", model, "-o", prompt, "--steps", "4",
                 "--batch-size", "2", "--num-prompts", "2", "--checkpoint-every", "2", "--log-every", "2"]) == 0
    assert "learned 2 prompts in 4 steps" in capsys.readouterr().out
    assert main(["tune-prompt", data["folder"], "--model", model, "--output", prompt, "--steps", "6",
                 "--batch-size", "2", "--num-prompts", "2", "--resume"]) == 0
    capsys.readouterr()
    out_dir = tmp_path / "seg"
    image = os.path.join(data["folder"], "images", "0000.png")
    assert main(["segment", image, "--learned-prompt", prompt, "--model", model, "--out-dir", str(out_dir)]) == 0
    assert "2 prompts" in capsys.readouterr().out
    assert Image.open(out_dir / "0000.png_mask.png").size == (32, 32)
    assert main(["segment", image, "--learned-prompt", prompt, "--prompt-image", image, "--prompt-mask", image,
                 "--model", model, "--out-dir", str(out_dir)]) == 1
    assert "either --learned-prompt or --prompt-image" in capsys.readouterr().err
    report = tmp_path / "folder_report.json"
    assert main(["evaluate", data["folder"], "--protocol", "folder", "--learned-prompt", prompt,
                 "--model", model, "-o", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["images"] == 6 and 0 <= result["FB-IoU"] <= 1 and set(result["class_IoU"]) == {"0", "1"}


def test_evaluate_fss_and_fold_protocols(hf_tiny, data, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    report = tmp_path / "fss.json"
    assert main(["evaluate", data["fss"], "--protocol", "fss1000", "--fss-split", "all", "--sampling", "all-pairs",
                 "--model", model, "--output", str(report)]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("fss1000: mIoU") and "evaluate" in printed.err
    result = json.loads(report.read_text())
    assert result["episodes"] == 8 and set(result["class_IoU"]) == {"red", "blue"}
    assert main(["evaluate", data["folder"], "--protocol", "coco20i", "--model", model]) == 1
    assert "needs --splits DIR" in capsys.readouterr().err
    assert main(["evaluate", data["folder"], "--protocol", "coco20i", "--sampling", "all-pairs", "--model", model]) == 1
    assert "needs class-id masks: pass --num-labels" in capsys.readouterr().err
    assert main(["evaluate", data["folder"], "--protocol", "coco20i", "--sampling", "all-pairs", "--fold", "1",
                 "--num-labels", "80", "--model", model]) == 1
    assert "no episodes" in capsys.readouterr().err
