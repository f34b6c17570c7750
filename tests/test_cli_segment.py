"""``seggpt-jax segment`` and ``seggpt-jax video`` end to end on a tiny random-weight checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import moving_square_clip
from PIL import Image

from seggpt_jax.cli import main

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "seggpt-jax")


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return str(path)


@pytest.fixture
def workspace(hf_tiny, tmp_path):
    _, model = hf_tiny("nonsquare")
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    sizes = [(40, 60), (75, 31), (23, 23), (100, 80), (12, 90)]
    for i, (h, w) in enumerate(sizes):
        _save(photos / f"img{i}.jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    prompt = _save(tmp_path / "prompt.png", rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    mask = np.zeros((50, 50), np.uint8)
    mask[10:30, 15:40] = 255
    binary_mask = _save(tmp_path / "prompt_mask.png", mask, "L")
    labels = rng.integers(0, 4, (50, 50)).astype(np.uint8)
    label_mask = _save(tmp_path / "prompt_labels.png", labels, "L")
    return dict(model=model, photos=str(photos), sizes=sizes, prompt=prompt, mask=binary_mask, labels=label_mask,
                out=str(tmp_path / "out"), tmp=tmp_path)


def test_segment_binary_folder(workspace, capsys):
    w = workspace
    code = main(["segment", w["photos"], "--prompt-image", w["prompt"], "--prompt-mask", w["mask"], "--out-dir",
                 w["out"], "--model", w["model"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "segmented 5 images (binary, 1 prompt)" in captured.out and "wrote 10 files" in captured.out
    assert "segment [" in captured.err and "5/5" in captured.err  # the progress bar
    for i, (h, w_) in enumerate(w["sizes"]):
        mask = Image.open(os.path.join(w["out"], f"img{i}_mask.png"))
        overlay = Image.open(os.path.join(w["out"], f"img{i}_overlay.png"))
        assert mask.mode == "L" and mask.size == (w_, h) and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert overlay.mode == "RGB" and overlay.size == (w_, h)
    assert sorted(os.listdir(w["out"])) == sorted([f"img{i}_{k}.png" for i in range(5) for k in ("mask", "overlay")])


def test_segment_semantic_with_two_prompts_via_console_script(workspace):
    w = workspace
    single = os.path.join(w["photos"], "img1.jpg")
    result = subprocess.run([CONSOLE_SCRIPT, "segment", single, "--prompt-image", w["prompt"], "--prompt-mask",
                             w["labels"], "--prompt-image", w["prompt"], "--prompt-mask", w["labels"], "--num-labels",
                             "3", "--out-dir", w["out"], "--model", w["model"]], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(3 classes, 2 prompts)" in result.stdout
    mask = Image.open(os.path.join(w["out"], "img1_mask.png"))
    assert mask.mode == "P" and mask.size == (31, 75) and np.asarray(mask).max() <= 3
    assert mask.getpalette()[:6] == [0, 0, 0, 255, 255, 255]  # class ids are indices into the SegGPT palette


@pytest.mark.parametrize("args, message", [
    (["missing.jpg"], "no such file or folder: missing.jpg"),
    (["EMPTY"], "holds no images"),
    (["BROKEN"], "cannot read image"),
    (["PHOTOS", "--drop-mask"], "got 1 --prompt-image and 0 --prompt-mask; give each prompt image with its mask"),
    (["PHOTOS", "--extra-mask"], "got 1 --prompt-image and 2 --prompt-mask"),
    (["PHOTOS", "--missing-prompt"], "no such file: nowhere.png"),
    (["PHOTOS", "--bad-labels"], "has labels [5] above num_labels=2"),
])
def test_segment_errors(workspace, capsys, args, message):
    w = workspace
    (w["tmp"] / "empty").mkdir()
    broken = w["tmp"] / "broken.png"
    broken.write_text("not a png")
    inputs = [{"EMPTY": str(w["tmp"] / "empty"), "BROKEN": str(broken), "PHOTOS": w["photos"]}.get(a, a)
              for a in args if not a.startswith("--")]
    prompt_args = ["--prompt-image", w["prompt"], "--prompt-mask", w["mask"]]
    extra = []
    if "--drop-mask" in args:
        prompt_args = ["--prompt-image", w["prompt"]]
    if "--extra-mask" in args:
        prompt_args += ["--prompt-mask", w["mask"]]
    if "--missing-prompt" in args:
        prompt_args = ["--prompt-image", "nowhere.png", "--prompt-mask", w["mask"]]
    if "--bad-labels" in args:
        big = _save(w["tmp"] / "big.png", np.full((50, 50), 5, np.uint8), "L")
        prompt_args = ["--prompt-image", w["prompt"], "--prompt-mask", big]
        extra = ["--num-labels", "2"]
    code = main(["segment", *inputs, *prompt_args, *extra, "--out-dir", w["out"], "--model", w["model"]])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], err
    leftovers = os.listdir(w["out"]) if os.path.isdir(w["out"]) else []
    assert not [f for f in leftovers if f.endswith(".png") or f.startswith(".partial")]


def test_segment_warns_for_a_mask_of_another_size(workspace, capsys):
    w = workspace
    other = _save(w["tmp"] / "small_mask.png", np.zeros((20, 30), np.uint8), "L")
    code = main(["segment", os.path.join(w["photos"], "img0.jpg"), "--prompt-image", w["prompt"], "--prompt-mask",
                 other, "--out-dir", w["out"], "--model", w["model"]])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"warning: prompt mask {other} is 30x20 but {w['prompt']} is 50x50" in err
    assert os.path.isfile(os.path.join(w["out"], "img0_mask.png"))


def test_offline_without_weights_fails_in_one_line(workspace, tmp_path):
    w = workspace
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    result = subprocess.run([CONSOLE_SCRIPT, "segment", w["photos"], "--prompt-image", w["prompt"], "--prompt-mask",
                             w["mask"], "--out-dir", w["out"]], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "cannot load 'BAAI/seggpt-vit-large'" in result.stderr and "Pass --model PATH" in result.stderr
    assert not os.listdir(w["out"])


def _clip_files(tmp_path, frames=5):
    images, mask = moving_square_clip(frames, (40, 56), step=5, seed=1)
    first_mask = _save(tmp_path / "first_mask.png", mask.astype(np.uint8) * 255, "L")
    return images, _save(tmp_path / "first.png", images[0]), first_mask


@pytest.mark.parametrize("container", ["folder", "gif", "webp", "apng", "mp4"])
def test_video_command(hf_tiny, tmp_path, capsys, container):
    _, model = hf_tiny("nonsquare")
    images, first, first_mask = _clip_files(tmp_path)
    if container == "folder":
        source = tmp_path / "frames_in"
        source.mkdir()
        for t, frame in enumerate(images):
            _save(source / f"f{t:03d}.png", frame)
    elif container == "mp4":
        av = pytest.importorskip("av")
        source = tmp_path / "clip.mp4"
        with av.open(str(source), "w") as out:
            stream = out.add_stream("mpeg4", rate=5)
            stream.width, stream.height = 56, 40
            for frame in images:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    else:
        suffix = {"gif": ".gif", "webp": ".webp", "apng": ".png"}[container]
        source = tmp_path / f"clip{suffix}"
        pictures = [Image.fromarray(f) for f in images]
        pictures[0].save(source, save_all=True, append_images=pictures[1:], duration=100, loop=0,
                         **({"lossless": True} if container == "webp" else {}))
    out_dir = tmp_path / "video_out"
    code = main(["video", "--prompt-image", first, "--prompt-mask", first_mask, "--frames", str(source),
                 "--out-dir", str(out_dir), "--context-frames", "2", "--model", model])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "segmented 5 frames (context 2)" in captured.out
    masks = sorted(os.listdir(out_dir / "frames"))
    assert len(masks) == 5 and all(m.endswith("_mask.png") for m in masks)
    assert Image.open(out_dir / "frames" / masks[0]).size == (56, 40)
    animation = Image.open(out_dir / "overlay.gif")
    assert animation.n_frames == 5 and animation.size == (56, 40)


def test_video_errors(hf_tiny, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    _, first, first_mask = _clip_files(tmp_path)
    base = ["video", "--prompt-image", first, "--prompt-mask", first_mask, "--out-dir", str(tmp_path / "o"),
            "--model", model]
    assert main(base + ["--frames", str(tmp_path / "nothing")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert main(base + ["--frames", first, "--context-frames", "-1"]) == 1
    assert "--context-frames must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["segment", "video", "info", "convert"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and f"usage: seggpt-jax {command}" in capsys.readouterr().out
