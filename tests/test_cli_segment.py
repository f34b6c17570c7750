"""``seggpt-jax segment`` and ``seggpt-jax video`` end to end on a tiny random-weight checkpoint: outputs,
messy inputs, files never lost, every error one line."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import moving_square_clip, save_image
from PIL import Image

from seggpt_jax.cli import main

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "seggpt-jax")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")


@pytest.fixture
def workspace(hf_tiny, tmp_path):
    _, model = hf_tiny("nonsquare")
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    sizes = [(40, 60), (75, 31), (23, 23), (100, 80), (12, 90)]
    for i, (h, w) in enumerate(sizes):
        save_image(photos / f"img{i}.jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    prompt = save_image(tmp_path / "prompt.png", rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    mask = np.zeros((50, 50), np.uint8)
    mask[10:30, 15:40] = 255
    binary_mask = save_image(tmp_path / "prompt_mask.png", mask, "L")
    labels = rng.integers(0, 4, (50, 50)).astype(np.uint8)
    label_mask = save_image(tmp_path / "prompt_labels.png", labels, "L")
    return dict(model=model, photos=str(photos), sizes=sizes, prompt=prompt, mask=binary_mask, labels=label_mask,
                out=str(tmp_path / "out"), tmp=tmp_path)


def _segment(w, *extra, inputs=None, prompt=None, out=None):
    prompt = prompt or ["--prompt-image", w["prompt"], "--prompt-mask", w["mask"]]
    return main(["segment", *(inputs or [w["photos"]]), *prompt, "--out-dir", out or w["out"], "--model", w["model"],
                 *extra])


def _outputs(folder):
    return sorted(f for f in os.listdir(folder) if not f.startswith(".")) if os.path.isdir(folder) else []


def _error_lines(err):
    return [line for line in err.splitlines() if "error:" in line]


def test_segment_binary_folder(workspace, capsys):
    w = workspace
    code = _segment(w)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "segmented 5 of 5 images (binary, 1 prompt)" in captured.out and "wrote 10 files" in captured.out
    assert "loading" in captured.err and "5/5" in captured.err  # status lines and the progress bar
    for i, (h, w_) in enumerate(w["sizes"]):
        mask = Image.open(os.path.join(w["out"], f"img{i}.jpg_mask.png"))
        overlay = Image.open(os.path.join(w["out"], f"img{i}.jpg_overlay.png"))
        assert mask.mode == "L" and mask.size == (w_, h) and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert overlay.mode == "RGB" and overlay.size == (w_, h)
    assert _outputs(w["out"]) == sorted([f"img{i}.jpg_{k}.png" for i in range(5) for k in ("mask", "overlay")])


def test_readme_main_job_runs_on_the_shipped_examples(workspace, tmp_path):
    """The README's main-job command, as written but for a local tiny checkpoint in place of the Hub id."""
    w = workspace
    result = subprocess.run([CONSOLE_SCRIPT, "segment", "examples/queries/", "--prompt-image", "examples/prompt.jpg",
                             "--prompt-mask", "examples/prompt_mask.png", "--out-dir", str(tmp_path / "out"),
                             "--model", w["model"]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    queries = sorted(os.listdir(os.path.join(EXAMPLES, "queries")))
    assert _outputs(tmp_path / "out") == sorted(f"{q}_{k}.png" for q in queries for k in ("mask", "overlay"))


def test_segment_semantic_with_two_prompts_via_console_script(workspace):
    w = workspace
    single = os.path.join(w["photos"], "img1.jpg")
    result = subprocess.run([CONSOLE_SCRIPT, "segment", single, "--prompt-image", w["prompt"], "--prompt-mask",
                             w["labels"], "--prompt-image", w["prompt"], "--prompt-mask", w["labels"], "--num-labels",
                             "3", "--out-dir", w["out"], "--model", w["model"]], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(3 classes, 2 prompts)" in result.stdout
    mask = Image.open(os.path.join(w["out"], "img1.jpg_mask.png"))
    assert mask.mode == "P" and mask.size == (31, 75) and np.asarray(mask).max() <= 3
    assert mask.getpalette()[:6] == [0, 0, 0, 255, 255, 255]  # class ids are indices into the SegGPT palette


def test_a_truncated_jpeg_in_the_middle_fails_alone(workspace, capsys):
    w = workspace
    photos = w["photos"]
    data = open(os.path.join(photos, "img2.jpg"), "rb").read()
    with open(os.path.join(photos, "img2.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    code = _segment(w)
    captured = capsys.readouterr()
    assert code == 1
    assert "segmented 4 of 5 images" in captured.out and "1 input failed:" in captured.out
    assert f"cannot read image {os.path.join(photos, 'img2.jpg')}: the file is truncated" in captured.out
    assert _outputs(w["out"]) == sorted(f"img{i}.jpg_{k}.png" for i in (0, 1, 3, 4) for k in ("mask", "overlay"))
    assert not [f for f in os.listdir(w["out"]) if f.startswith(".partial")]


def test_outputs_respect_the_umask(workspace):
    w = workspace
    old = os.umask(0o022)
    try:
        assert _segment(w) == 0
    finally:
        os.umask(old)
    for name in _outputs(w["out"]) + [".seggpt-jax-outputs.jsonl"]:
        mode = stat.S_IMODE(os.stat(os.path.join(w["out"], name)).st_mode)
        assert mode == 0o644, (name, oct(mode))
    assert stat.S_IMODE(os.stat(w["out"]).st_mode) == 0o755


def test_rerun_into_the_input_folder_skips_its_own_outputs_and_never_replaces_other_files(workspace, capsys):
    w = workspace
    photos = w["photos"]
    save_image(os.path.join(photos, "img0.jpg_overlay.png"), np.zeros((5, 5, 3), np.uint8))  # the user's file, same name
    assert _segment(w, out=photos) == 1
    out = capsys.readouterr().out
    assert "segmented 5 of 6 images" in out and "img0.jpg_overlay.png exists and was not written by seggpt-jax" in out
    ours = [f for f in os.listdir(photos) if f.startswith("img1.")]
    assert sorted(ours) == ["img1.jpg", "img1.jpg_mask.png", "img1.jpg_overlay.png"]
    before = {f: os.stat(os.path.join(photos, f)).st_mtime_ns for f in os.listdir(photos)}
    assert np.asarray(Image.open(os.path.join(photos, "img0.jpg_overlay.png"))).max() == 0  # left alone

    assert _segment(w, out=photos) == 1  # a rerun: the 5 done are skipped, the model is not even loaded
    captured = capsys.readouterr()
    assert "segmented 0 of 6 images" in captured.out and "5 already done (skipped)" in captured.out
    assert "img0.jpg_overlay.png exists and was not written by seggpt-jax" in captured.out
    assert "loading" not in captured.err
    assert {f: os.stat(os.path.join(photos, f)).st_mtime_ns for f in os.listdir(photos)} == before

    assert _segment(w, "--overwrite", out=photos) == 1  # replaces its own outputs only; never reads them as inputs
    out = capsys.readouterr().out
    assert "segmented 5 of 6 images" in out and "wrote 10 files" in out
    assert np.asarray(Image.open(os.path.join(photos, "img0.jpg_overlay.png"))).max() == 0
    assert set(os.listdir(photos)) == set(before)


COMPILE_TIMES = """
import sys, jax
from seggpt_jax.cli import main
from seggpt_jax.inference import segmenter
marks = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: marks.append("compile") if event == "/jax/core/compile/backend_compile_duration"
    else None)
paint = segmenter.Segmenter.paint_rows  # every forward goes through it
segmenter.Segmenter.paint_rows = lambda self, *a, **k: (marks.append("forward"), paint(self, *a, **k))[1]
code = main(sys.argv[1:])
print("MARKS", " ".join(marks))
sys.exit(code)
"""


def test_the_forward_compiles_while_the_weights_load(workspace):
    w = workspace
    result = subprocess.run([sys.executable, "-c", COMPILE_TIMES, "segment", w["photos"], "--prompt-image",
                             w["prompt"], "--prompt-mask", w["mask"], "--out-dir", w["out"], "--model", w["model"]],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    marks = next(line for line in result.stdout.splitlines() if line.startswith("MARKS")).split()[1:]
    assert marks.count("forward") == 5 and "compile" in marks
    assert "compile" not in marks[marks.index("forward"):], marks  # nothing left to compile once segmenting


def test_binary_prompt_mask_levels_reach_the_model_as_given(workspace, monkeypatch):
    """An RGB mask with anti-aliased grey edges goes in as its own levels, as the BAAI code feeds it."""
    from seggpt_jax.inference import prompts as prompts_module

    w = workspace
    mask = np.zeros((50, 50, 3), np.uint8)
    mask[10:30, 15:40] = 255
    mask[9, 15:40] = 62  # anti-aliased edge
    mask[30, 15:40] = (4, 59, 126)
    soft = save_image(w["tmp"] / "soft.png", mask)
    seen = []
    real = prompts_module.prompt_picture
    monkeypatch.setattr(prompts_module, "prompt_picture", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    assert _segment(w, inputs=[os.path.join(w["photos"], "img0.jpg")],
                    prompt=["--prompt-image", w["prompt"], "--prompt-mask", soft]) == 0
    np.testing.assert_array_equal(seen[-1], mask)


@pytest.mark.parametrize("case, message", [
    ("missing input", "no such file or folder: missing.jpg"),
    ("empty folder", "holds no images"),
    ("prompt image without mask", "got 1 --prompt-image and 0 --prompt-mask; give each prompt image with its mask"),
    ("extra mask", "got 1 --prompt-image and 2 --prompt-mask"),
    ("missing prompt", "no such image file: nowhere.png"),
    ("labels above num_labels", "has labels [5] above num_labels=2"),
    ("out-dir is a file", "--out-dir OUT exists and is not a folder"),
    ("compilation cache is a file", "--compilation-cache CACHE exists and is not a folder"),
    ("num-labels 300", "--num-labels 300: at most 255 classes"),
    ("colour map without num-labels", "--colour-map maps colours to class ids: it needs --num-labels"),
    ("unknown colour map", "--colour-map: colour map 'nowhere.json' is neither 'voc' nor a JSON file"),
    ("voc-coloured mask", "has colours that are neither class ids (grey, R=G=B) nor in the 3-label palette: "
                          "(192, 128, 128)"),
])
def test_segment_errors_are_one_line_before_the_model_loads(workspace, capsys, case, message):
    w = workspace
    tmp = w["tmp"]
    inputs, prompt, extra, out = [w["photos"]], ["--prompt-image", w["prompt"], "--prompt-mask", w["mask"]], [], None
    if case == "missing input":
        inputs = ["missing.jpg"]
    elif case == "empty folder":
        (tmp / "empty").mkdir()
        inputs = [str(tmp / "empty")]
    elif case == "prompt image without mask":
        prompt = ["--prompt-image", w["prompt"]]
    elif case == "extra mask":
        prompt += ["--prompt-mask", w["mask"]]
    elif case == "missing prompt":
        prompt = ["--prompt-image", "nowhere.png", "--prompt-mask", w["mask"]]
    elif case == "labels above num_labels":
        prompt[-1] = save_image(tmp / "big.png", np.full((50, 50), 5, np.uint8), "L")
        extra = ["--num-labels", "2"]
    elif case == "out-dir is a file":
        out = str(tmp / "OUT")
        (tmp / "OUT").write_text("a file")
    elif case == "compilation cache is a file":
        (tmp / "CACHE").write_text("a file")
        extra = ["--compilation-cache", str(tmp / "CACHE")]
    elif case == "num-labels 300":
        extra = ["--num-labels", "300"]
    elif case == "colour map without num-labels":
        extra = ["--colour-map", "voc"]
    elif case == "unknown colour map":
        extra = ["--num-labels", "3", "--colour-map", "nowhere.json"]
    elif case == "voc-coloured mask":
        voc = np.zeros((50, 50, 3), np.uint8)
        voc[10:30, 10:30] = (192, 128, 128)  # VOC's "person"
        prompt[-1] = save_image(tmp / "voc.png", voc)
        extra = ["--num-labels", "3"]
    code = _segment(w, *extra, inputs=inputs, prompt=prompt, out=out)
    err = capsys.readouterr().err
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and message.replace("OUT", str(tmp / "OUT")).replace("CACHE", str(tmp / "CACHE")) \
        in lines[0], err
    assert "loading" not in err  # checked before the model loads
    assert not os.path.isdir(w["out"]) or not os.listdir(w["out"])


def test_a_voc_coloured_mask_is_read_through_an_explicit_colour_map(workspace, capsys):
    w = workspace
    voc = np.zeros((50, 50, 3), np.uint8)
    voc[10:30, 10:30] = (192, 128, 128)  # VOC class 15, "person"
    voc[35:45, 5:45] = (224, 224, 192)  # the void border: background
    path = save_image(w["tmp"] / "voc.png", voc)
    colours = w["tmp"] / "colours.json"
    colours.write_text('{"192,128,128": 1, "#E0E0C0": 0, "0,0,0": 0}')
    for spec in (str(colours), "voc"):
        labels = 15 if spec == "voc" else 1
        code = _segment(w, "--num-labels", str(labels), "--colour-map", spec, "--overwrite",
                        inputs=[os.path.join(w["photos"], "img0.jpg")],
                        prompt=["--prompt-image", w["prompt"], "--prompt-mask", path])
        assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_is_one_line(workspace, capsys, monkeypatch, error):
    import seggpt_jax.files as files

    w = workspace
    written = []
    real = files.atomic_save

    def failing(path, write, **kwargs):
        if len(written) >= 2:
            raise OSError(error, os.strerror(error), path)
        real(path, write, **kwargs)
        written.append(path)

    monkeypatch.setattr(files, "atomic_save", failing)
    assert _segment(w) == 1
    captured = capsys.readouterr()
    lines = _error_lines(captured.err)
    assert len(lines) == 1 and os.strerror(error) in lines[0] and "Traceback" not in captured.err
    # the count is of the files that exist: writes run on several threads, so a write that started before
    # the disk filled may still land, and which input's write met the full disk first may vary
    stopped = re.search(r"stopped after (\d) of 5 images; wrote (\d) files", captured.out)
    assert stopped and int(stopped.group(2)) == len(_outputs(w["out"])) >= 2, captured.out
    assert int(stopped.group(1)) == len({name.split("_")[0] for name in _outputs(w["out"])
                                         if _outputs(w["out"]).count(name.split("_")[0] + "_mask.png")
                                         and name.endswith("_overlay.png")}), captured.out
    assert not [f for f in os.listdir(w["out"]) if f.startswith(".partial")]


def test_segment_warns_for_a_mask_of_another_size(workspace, capsys):
    w = workspace
    small = np.zeros((20, 30), np.uint8)
    small[5:15, 10:20] = 255
    other = save_image(w["tmp"] / "small_mask.png", small, "L")
    code = _segment(w, inputs=[os.path.join(w["photos"], "img0.jpg")],
                    prompt=["--prompt-image", w["prompt"], "--prompt-mask", other])
    err = capsys.readouterr().err
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and f"prompt mask {other} is 30x20 but its image is 50x50" in warnings[0]
    assert os.path.isfile(os.path.join(w["out"], "img0.jpg_mask.png"))


def test_offline_without_weights_fails_in_one_line(workspace, tmp_path):
    w = workspace
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    result = subprocess.run([CONSOLE_SCRIPT, "segment", w["photos"], "--prompt-image", w["prompt"], "--prompt-mask",
                             w["mask"], "--out-dir", w["out"]], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "cannot load 'BAAI/seggpt-vit-large'" in errors[0] and "Pass --model PATH" in errors[0]
    assert not _outputs(w["out"])


# ------------------------------------------------------------------------------------ video
def _clip_files(tmp_path, frames=5):
    images, mask = moving_square_clip(frames, (40, 56), step=5, seed=1)
    first_mask = save_image(tmp_path / "first_mask.png", mask.astype(np.uint8) * 255, "L")
    return images, save_image(tmp_path / "first.png", images[0]), first_mask


def _write_mp4(path, frames, rate=5):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("container", ["folder", "gif", "webp", "apng", "mp4"])
def test_video_command(hf_tiny, tmp_path, capsys, container):
    _, model = hf_tiny("nonsquare")
    images, first, first_mask = _clip_files(tmp_path)
    if container == "folder":
        source = tmp_path / "frames_in"
        source.mkdir()
        for t, frame in enumerate(images):
            save_image(source / f"f{t:03d}.png", frame)
    elif container == "mp4":
        source = tmp_path / "clip.mp4"
        _write_mp4(source, images)
    else:
        suffix = {"gif": ".gif", "webp": ".webp", "apng": ".png"}[container]
        source = tmp_path / f"clip{suffix}"
        pictures = [Image.fromarray(f) for f in images]
        pictures[0].save(source, save_all=True, append_images=pictures[1:], duration=100, loop=0,
                         **({"lossless": True} if container == "webp" else {}))
    out_dir = tmp_path / "video_out"
    overlay = "gif" if container == "gif" else "mp4"
    code = main(["video", str(source), "--prompt-image", first, "--prompt-mask", first_mask, "--out-dir", str(out_dir),
                 "--context-frames", "2", "--overlay", overlay, "--model", model])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "segmented 5 frames (context 2)" in captured.out
    masks = sorted(f for f in os.listdir(out_dir / "frames") if not f.startswith("."))
    assert len(masks) == 5 and all(m.endswith("_mask.png") for m in masks)
    assert Image.open(out_dir / "frames" / masks[0]).size == (56, 40)
    if overlay == "gif":
        animation = Image.open(out_dir / "overlay.gif")
        assert animation.n_frames == 5 and animation.size == (56, 40)
    else:
        av = pytest.importorskip("av")
        with av.open(str(out_dir / "overlay.mp4")) as video:
            decoded = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
            rate = video.streams.video[0].average_rate
        assert len(decoded) == 5 and decoded[0].shape == (40, 56, 3)
        assert float(rate) == (5 if container == "mp4" else 10)  # the clip's own rate, else the APNG/WebP's


def test_video_of_mixed_frame_sizes_and_first_frame_as_prompt(hf_tiny, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    images, _, first_mask = _clip_files(tmp_path, frames=4)
    source = tmp_path / "frames_in"
    source.mkdir()
    for t, frame in enumerate(images):
        picture = Image.fromarray(frame)
        if t % 2:
            picture = picture.resize((30 + 7 * t, 50))
        picture.save(source / f"f{t:03d}.png")
    out_dir = tmp_path / "v"
    code = main(["video", str(source), "--prompt-mask", first_mask, "--out-dir", str(out_dir), "--overlay", "gif",
                 "--fps", "4", "--model", model])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out_dir / "frames" / "f001.png_mask.png").size == (37, 50)
    animation = Image.open(out_dir / "overlay.gif")
    assert animation.n_frames == 4 and animation.size == (56, 40) and animation.info["duration"] == 250


def test_video_errors(hf_tiny, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    _, first, first_mask = _clip_files(tmp_path)
    base = ["--prompt-image", first, "--prompt-mask", first_mask, "--out-dir", str(tmp_path / "o"), "--model", model]
    assert main(["video", str(tmp_path / "nothing"), *base]) == 1
    assert "no such file or folder" in _error_lines(capsys.readouterr().err)[0]
    for option, value, message in (("--context-frames", "-1", "must be an integer >= 0"),
                                   ("--fps", "-50", "must be a positive number")):
        with pytest.raises(SystemExit) as exit_:
            main(["video", first, *base, option, value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
        assert err.startswith(f"seggpt-jax video: error: argument {option}:")


@pytest.mark.parametrize("command", ["segment", "video", "info", "convert", "finetune", "tune-prompt", "evaluate"])
def test_every_command_has_help_with_every_option_explained(command, capsys):
    from seggpt_jax.cli.main import build_parser

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and f"usage: seggpt-jax {command}" in capsys.readouterr().out
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    undocumented = [a.option_strings or a.dest for a in sub._actions if not a.help]
    assert not undocumented


def test_version(capsys):
    import seggpt_jax

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"seggpt-jax {seggpt_jax.__version__}"
