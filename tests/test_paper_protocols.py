"""The paper's procedures: the spatial ensemble's canvas, DAVIS J and F by hand, multi-object video (a stub
model whose answers are known, then the tiny model through the command line), bad samples in an FSS-1000
folder, and ``benchmarks.paper_tables`` end to end on generated miniatures of every layout."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from seggpt_jax import Segmenter
from seggpt_jax.cli import main
from seggpt_jax.data import splits as split_lists
from seggpt_jax.eval.davis import (DavisDataset, DavisMeter, boundary_map, boundary_measure, disk_offsets,
                                   evaluate_davis, region_similarity)
from seggpt_jax.imaging.processor import IMAGENET_MEAN, IMAGENET_STD, SegGptImageProcessor
from seggpt_jax.inference.ensemble import grid_cells, spatial_canvas, spatial_prompt
from seggpt_jax.inference.prompts import Prompt
from seggpt_jax_testing.benchmarks import (davis_objects, davis_palette, write_coco_miniature, write_davis_miniature,
                                           write_pascal_miniature)
from seggpt_jax_testing.synthetic import synthetic_pair, write_synthetic_fss


# ------------------------------------------------------------------------------------ spatial ensemble
def test_spatial_canvas_against_a_hand_built_one():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((10, 20, 3), (30, 12, 3), (16, 16, 3))]
    left_half = np.zeros((32, 32, 3), np.uint8)
    left_half[:, :16] = 255
    top_row = np.zeros((4, 4, 3), np.uint8)
    top_row[0] = 255
    masks = [left_half, top_row, np.full((16, 16, 3), 255, np.uint8)]
    image, mask = spatial_canvas(images, masks, (32, 32))
    # three prompts: a 2x2 grid of 16x16 cells, filled row by row; the fourth cell stays black
    expected = np.zeros((32, 32, 3), np.uint8)
    expected[:16, :16] = np.asarray(Image.fromarray(images[0]).resize((16, 16), Image.BICUBIC))
    expected[:16, 16:] = np.asarray(Image.fromarray(images[1]).resize((16, 16), Image.BICUBIC))
    expected[16:, :16] = images[2]
    np.testing.assert_array_equal(image, expected)
    expected_mask = np.zeros((32, 32, 3), np.uint8)
    expected_mask[:16, :8] = 255  # the left half of the first mask, at half size
    expected_mask[:4, 16:32] = 255  # the top row of a 4x4 mask, at 16x16 (each source pixel 4x4)
    expected_mask[16:, :16] = 255
    np.testing.assert_array_equal(mask, expected_mask)
    # five prompts: a 3x3 grid cut at floor(i * 32 / 3) = 0, 10, 21, 32
    assert grid_cells(5, (32, 32)) == [(0, 0, 10, 10), (0, 10, 10, 11), (0, 21, 10, 11), (10, 0, 11, 10),
                                       (10, 10, 11, 11)]
    processor = SegGptImageProcessor(size=(32, 32))
    prepared = spatial_prompt(list(zip(images, masks)), processor)
    mean, std = np.asarray(IMAGENET_MEAN)[:, None, None], np.asarray(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(prepared.prompt_pixel_values, (expected.transpose(2, 0, 1) / 255 - mean) / std,
                               atol=1e-6)
    np.testing.assert_allclose(prepared.prompt_masks, (expected_mask.transpose(2, 0, 1) / 255 - mean) / std,
                               atol=1e-6)


# ------------------------------------------------------------------------------------ J and F
def test_j_and_f_by_hand():
    gt = np.zeros((10, 10), bool)
    gt[4, 4] = True
    # a lone pixel's boundary is the 2x2 block above-left of it (each pixel compared to its right, lower and
    # lower-right neighbour)
    expected = np.zeros((10, 10), bool)
    expected[3:5, 3:5] = True
    np.testing.assert_array_equal(boundary_map(gt), expected)
    shifted = np.zeros((10, 10), bool)
    shifted[4, 6] = True
    # radius ceil(0.008 * sqrt(200)) = 1: a plus-shaped disk. The predicted boundary (rows 3-4, cols 5-6) has its
    # column 5 within one pixel of the true one (rows 3-4, cols 3-4): precision 2/4, recall 2/4
    assert region_similarity(gt, shifted) == 0.0
    assert boundary_measure(gt, shifted) == pytest.approx(0.5)
    assert region_similarity(gt, gt) == 1.0 and boundary_measure(gt, gt) == 1.0
    empty = np.zeros((10, 10), bool)
    assert region_similarity(empty, empty) == 1.0 and boundary_measure(empty, empty) == 1.0
    assert boundary_measure(gt, empty) == 0.0 and boundary_measure(empty, gt) == 0.0
    square, wider = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    square[2:6, 2:6] = True
    wider[2:6, 2:7] = True
    assert region_similarity(square, wider) == pytest.approx(16 / 20)
    assert len(disk_offsets(8)) == 197  # lattice points within radius 8: DAVIS 480p's disk (ceil(0.008 * 979.6))

    meter = DavisMeter()
    half = np.zeros((10, 10), np.int64)
    half[:, :5] = 1
    meter.add("a", [1, 2], half, half)  # object 1: J 1, F 1; object 2 absent from both: J 1, F 1
    wrong = np.zeros((10, 10), np.int64)
    wrong[:, :5] = 2
    meter.add("a", [1, 2], half, wrong)  # object 1: J 0, F 0 (no predicted pixels); object 2: J 0, F 0
    report = meter.report()
    assert report["J-Mean"] == pytest.approx(0.5) and report["F-Mean"] == pytest.approx(0.5)
    meter.add("b", [1], half, half)  # a second sequence, one object, one frame: J 1, F 1
    report = meter.report()
    # J&F: the mean over the three objects' means (0.5, 0.5, 1), J and F alike
    assert report["J&F-Mean"] == pytest.approx(2 / 3) and report["objects"] == 3


# ------------------------------------------------------------------------------------ multi-object video
class _ShiftingStub:
    """A stand-in for the model: each query is painted with the mask of its *last* prompt (the last valid one,
    when some slots are unused: ``prompt_valid``), moved one pixel right, so a video's answers are known
    exactly: frame t's is the first mask moved t + 1 pixels (each frame prompts with the previous frame's
    answer when there is context)."""

    def __init__(self, size=(32, 32)):
        self.config = types.SimpleNamespace(query_size=size)

    def __call__(self, queries, prompt_images, prompt_masks, *, prompts_per_query=1, prompt_valid=None, **options):
        rows = len(queries)
        valid = np.ones(rows, bool) if prompt_valid is None else np.asarray(prompt_valid)
        groups = valid.reshape(-1, prompts_per_query)
        last_in_group = prompts_per_query - 1 - np.argmax(groups[:, ::-1], axis=1)  # [queries]
        last = np.repeat(np.arange(len(groups)) * prompts_per_query + last_in_group, prompts_per_query)
        painted = np.roll(prompt_masks[last], 1, axis=-1)
        return types.SimpleNamespace(pred_masks=np.concatenate([np.zeros_like(painted), painted], axis=2))


def test_multi_object_video_follows_its_objects(tmp_path):
    segmenter = Segmenter(_ShiftingStub(), batch_size=3)  # 3 rows a forward: objects split over forwards
    first = davis_objects(0, (32, 32), 1)
    mask = Image.fromarray(first, mode="P")
    mask.putpalette(davis_palette())
    frames = [np.full((32, 32, 3), 60 + t, np.uint8) for t in range(5)]
    results = list(segmenter.segment_video(frames, Prompt(frames[0], mask), context_frames=2))
    for t, result in enumerate(results):
        np.testing.assert_array_equal(result.mask, np.roll(first, t + 1, axis=1), err_msg=f"frame {t}")
    # without context every frame is answered from the first prompt alone
    results = list(segmenter.segment_video(frames, Prompt(frames[0], mask), context_frames=0))
    assert all(np.array_equal(r.mask, np.roll(first, 1, axis=1)) for r in results)


@pytest.mark.parametrize("shift", [1, 2])
def test_davis_protocol_on_a_known_answer(tmp_path, shift):
    davis = write_davis_miniature(tmp_path, frames=6, shift=shift)
    report = evaluate_davis(Segmenter(_ShiftingStub(), batch_size=4), DavisDataset(davis), context_frames=3)
    assert report["sequences"] == 2 and report["objects"] == 4 and report["frames_scored"] == 8
    if shift == 1:  # the stub's answers are the true masks: J = F = 1
        assert report["J&F-Mean"] == 1.0
    else:  # objects 8 and 6 pixels wide; at scored frame t the answer lags the truth by t pixels
        j = [np.mean([(w - t) / (w + t) for t in range(1, 5)]) for w in (8, 6)]
        assert report["J-Mean"] == pytest.approx(np.mean(j * 2))


def test_video_command_with_a_palette_mask(hf_tiny, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    davis = write_davis_miniature(tmp_path, sequences=("clip",), frames=3)
    clip = os.path.join(davis, "JPEGImages", "480p", "clip")
    first_mask = os.path.join(davis, "Annotations", "480p", "clip", "00000.png")
    out = tmp_path / "out"
    assert main(["video", clip, "--prompt-mask", first_mask, "--out-dir", str(out), "--context-frames", "1",
                 "--overlay", "gif", "--model", model]) == 0
    assert "2 objects" in capsys.readouterr().out
    written = sorted(n for n in os.listdir(out / "frames") if not n.startswith("."))
    assert written == [f"{t:05d}.jpg_mask.png" for t in range(3)]
    for name in written:
        with Image.open(out / "frames" / name) as picture:
            assert picture.mode == "P" and picture.getpalette()[:9] == davis_palette()[:9]
            assert set(np.unique(np.asarray(picture))) <= {0, 1, 2}
    assert (out / "overlay.gif").is_file()
    # the same clip through `evaluate --protocol davis` (one scored frame: the middle one)
    report = tmp_path / "davis.json"
    assert main(["evaluate", davis, "--protocol", "davis", "--context-frames", "1", "--model", model,
                 "-o", str(report)]) == 0
    assert capsys.readouterr().out.startswith("davis: J&F ")
    result = json.loads(report.read_text())
    assert result["frames_scored"] == 1 and result["objects"] == 2 and 0 <= result["J&F-Mean"] <= 1
    assert result["settings"]["context_frames"] == 1 and set(result["per_object"]) == {"clip_1", "clip_2"}


# ------------------------------------------------------------------------------------ bad samples
def test_bad_samples_are_named_and_the_run_completes(hf_tiny, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    data = write_synthetic_fss(tmp_path / "fss", 10, colours=("red", "blue"), size=(16, 16))
    wrong_size = os.path.join(data, "blue", "3.png")
    Image.fromarray(np.zeros((12, 20), np.uint8), mode="L").save(wrong_size)
    photo = os.path.join(data, "red", "5.png")
    Image.fromarray(synthetic_pair(np.random.default_rng(1), (16, 16))[0]).save(photo)
    base = ["evaluate", data, "--protocol", "fss1000", "--fss-split", "all", "--model", model, "--batch-size", "8"]
    report = tmp_path / "report.json"
    assert main([*base, "-o", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"{wrong_size}: is 20x12 but its image is 16x16 (resized to its image (nearest))" in out
    assert f"{photo}: is a colour picture, not a binary mask (read as HSNet does" in out
    result = json.loads(report.read_text())
    assert result["episodes"] == 20 and result["skipped_episodes"] == 0
    assert {b["file"] for b in result["bad_samples"]} == {wrong_size, photo}
    assert result["settings"]["on_bad_sample"] == "resize" and result["settings"]["sampling"] == "hsnet"

    assert main([*base, "--on-bad-sample", "skip"]) == 1  # their episodes are left out: exit status 1
    out = capsys.readouterr().out
    assert wrong_size in out and photo in out and "episodes left out" in out
    assert main([*base, "--on-bad-sample", "fail"]) == 1
    err = capsys.readouterr().err
    assert wrong_size in err and photo in err and "loading" not in err  # stopped before the model loads


# ------------------------------------------------------------------------------------ paper tables
def test_paper_tables_end_to_end_on_miniatures(hf_tiny, tmp_path, monkeypatch, capsys):
    from benchmarks import paper_tables

    _, model = hf_tiny("nonsquare")
    fss = write_synthetic_fss(tmp_path / "fss" / "FSS-1000", 10, colours=("red", "blue"), size=(16, 16))
    splits = tmp_path / "splits"
    sums = write_pascal_miniature(tmp_path / "pascal", splits, per_class=2, size=(16, 16))
    sums.update(write_coco_miniature(tmp_path / "coco", splits, per_class=2, size=(16, 16)))
    davis = write_davis_miniature(tmp_path / "davis", sequences=("bike",), frames=5)
    monkeypatch.setattr(split_lists, "HSNET_SHA256", sums)  # generated lists stand in for HSNet's
    out = tmp_path / "results"
    argv = ["--fss", os.path.dirname(fss), "--pascal", str(tmp_path / "pascal"), "--coco", str(tmp_path / "coco"),
            "--splits", str(splits), "--davis", davis, "--model", model, "--batch-size", "1", "--out-dir", str(out),
            "--fss-split", "all", "--episodes-per-fold", "2", "--davis-context", "1,8", "--few-shot", "2",
            "--fss-few-shot", "2"]  # few programs to compile: 1, 2 or 3 prompts, one query a forward
    result = paper_tables.run(argv)
    runs = result["few_shot"]
    # FSS-1000: 1-shot, 2-shot feature, 2-shot spatial; PASCAL and COCO: 4 folds x (1, 2)-shot; each instance and
    # semantic
    assert len(runs) == 2 * (3 + 2 * 4 * 2)
    assert {(r["protocol"], r["fold"], r["shots"], r["ensemble"]) for r in runs if r["protocol"] != "fss1000"} == \
        {(p, f, s, "original") for p in ("pascal5i", "coco20i") for f in range(4) for s in (1, 2)}
    assert all(0 <= r["mIoU"] <= 100 and r["report"]["episodes"] == (20 if r["protocol"] == "fss1000" else 2)
               for r in runs)
    pascal = next(r for r in runs if r["protocol"] == "pascal5i" and r["fold"] == 2)
    assert pascal["report"]["settings"]["absent_classes"] == "zero" and pascal["report"]["classes"] == 5
    assert set(pascal["report"]["splits_sha256"]) == {"pascal/val/fold2.txt"}
    assert [v["context_frames"] for v in result["davis"]] == [1, 8]
    assert result["davis"][0]["report"]["objects"] == 2
    assert not result["protocol_complete"]
    json_file, md_file = result["files"]
    assert os.path.basename(json_file).startswith("paper-tables-") and json_file.endswith(".json")
    text = open(md_file).read()
    assert "Not the protocol" in text and "| 56.1 |" in text and "| 89.3 |" in text and "| 75.6 |" in text
    assert json.load(open(json_file))["few_shot"][0]["report"]["settings"]["protocol"] == "fss1000"
    again = paper_tables.write(result, str(out))  # never over an existing result
    assert again[0].endswith("-2.json") and open(json_file).read() != ""
