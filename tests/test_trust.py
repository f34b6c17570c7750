"""Trust on real use: no output under another input's name, no user's file replaced by any command, no
prompt misread in silence, runs that resume, and exits that never abort (issue "Trust, second pass")."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import save_image
from PIL import Image

from seggpt_jax.cli import main
from seggpt_jax.files import MANIFEST, OutputFolder
from seggpt_jax.imaging.masks import MaskWarning, binary_picture, prompt_picture
from seggpt_jax_testing.synthetic import write_synthetic_fss, write_synthetic_folder

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "seggpt-jax")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(folder):
    return sorted(f for f in os.listdir(folder) if not f.startswith(".")) if os.path.isdir(folder) else []


def _digests(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in _files(folder)}


def _error_lines(err):
    return [line for line in err.splitlines() if "error:" in line]


@pytest.fixture
def w(hf_tiny, tmp_path):
    _, model = hf_tiny("nonsquare")
    rng = np.random.default_rng(3)
    prompt = save_image(tmp_path / "prompt.png", rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    mask = np.zeros((50, 50), np.uint8)
    mask[10:30, 15:40] = 255
    return dict(model=model, prompt=prompt, mask=save_image(tmp_path / "prompt_mask.png", mask, "L"), tmp=tmp_path,
                rng=rng, out=str(tmp_path / "out"))


def _segment(w, inputs, *extra, out=None):
    return main(["segment", *inputs, "--prompt-image", w["prompt"], "--prompt-mask", w["mask"], "--out-dir",
                 w["out"] if out is None else out, "--model", w["model"], *extra])


# ------------------------------------------------------------------------------------ output names
def test_inputs_that_share_a_stem_get_their_own_outputs(w, capsys):
    photos = w["tmp"] / "photos"
    photos.mkdir()
    for name in ("x.jpg", "x.png", "x-2.jpg"):
        save_image(photos / name, w["rng"].integers(0, 256, (30 + len(name), 40, 3), dtype=np.uint8))
    for extra in ([], ["--overwrite"]):
        assert _segment(w, [str(photos)], *extra) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert "segmented 3 of 3 images" in out and "wrote 6 files" in out
        assert _files(w["out"]) == sorted(f"{n}_{k}.png" for n in ("x.jpg", "x.png", "x-2.jpg")
                                          for k in ("mask", "overlay"))
    # each output is its own input's answer: the same as segmenting that input alone
    for name in ("x.jpg", "x.png", "x-2.jpg"):
        alone = str(w["tmp"] / f"alone-{name}")
        assert _segment(w, [str(photos / name)], out=alone) == 0
        assert _digests(alone) == {k: v for k, v in _digests(w["out"]).items() if k.startswith(name + "_")}
    capsys.readouterr()


def test_inputs_of_the_same_name_from_two_folders_are_refused_before_any_work(w, capsys):
    for folder in ("a", "b"):
        (w["tmp"] / folder).mkdir()
        save_image(w["tmp"] / folder / "x.jpg", w["rng"].integers(0, 256, (20, 20, 3), dtype=np.uint8))
    assert _segment(w, [str(w["tmp"] / "a"), str(w["tmp"] / "b")]) == 1
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "a/x.jpg and" in lines[0] and "b/x.jpg" in lines[0] and "loading" not in err
    assert not os.path.exists(w["out"])


def test_video_frames_that_share_a_stem_get_their_own_masks(w, capsys):
    frames = w["tmp"] / "frames"
    frames.mkdir()
    for name in ("f1.png", "f1.jpg", "f2.png"):
        save_image(frames / name, w["rng"].integers(0, 256, (40, 56, 3), dtype=np.uint8))
    for extra in ([], ["--overwrite"]):
        code = main(["video", str(frames), "--prompt-mask", w["mask"], "--out-dir", w["out"], "--overlay", "gif",
                     "--context-frames", "1", "--model", w["model"], *extra])
        assert code == 0, capsys.readouterr().err
        assert _files(os.path.join(w["out"], "frames")) == ["f1.jpg_mask.png", "f1.png_mask.png", "f2.png_mask.png"]
    out = capsys.readouterr().out
    assert "segmented 3 frames" in out and "wrote 3 masks" in out


# ------------------------------------------------------------------------------------ users' files
def test_finetune_never_replaces_or_appends_to_the_users_files(hf_tiny, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    data = write_synthetic_fss(tmp_path / "fss", 3, colours=("red",), size=(32, 32))
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    mine = {"final/model.safetensors": b"my weights", "report.json": b"{\"mine\": 1}\n", "log.jsonl": b"my log\n"}
    for name, data_ in mine.items():
        (run / name).write_bytes(data_)
    base = ["finetune", data, "--data-layout", "fss1000", "--model", model, "--out-dir", str(run), "--steps", "2",
            "--batch-size", "2", "--warmup-steps", "1"]
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert len(_error_lines(err)) == 1 and "was not written by seggpt-jax" in err or "no checkpoint" in err, err
        assert "loading" not in err
    assert {name: (run / name).read_bytes() for name in mine} == mine


def test_finetune_keeps_only_its_newest_checkpoints_and_leaves_other_folders(hf_tiny, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    data = write_synthetic_fss(tmp_path / "fss", 3, colours=("red",), size=(32, 32))
    run = tmp_path / "run"
    (run / "step_9999999").mkdir(parents=True)  # someone else's folder of a checkpoint-like name
    (run / "notes.txt").write_text("mine")
    base = ["finetune", data, "--data-layout", "fss1000", "--model", model, "--out-dir", str(run), "--steps", "5",
            "--batch-size", "2", "--warmup-steps", "1", "--checkpoint-every", "1", "--log-every", "1"]
    assert main(base + ["--keep-checkpoints", "2"]) == 0, capsys.readouterr().err
    assert _files(run) == ["final", "latest", "log.jsonl", "notes.txt", "report.json", "step_0000004",
                                       "step_0000005", "step_9999999"]
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert main(base) == 1 and "already holds a run" in capsys.readouterr().err  # never a second run on top
    assert main(base + ["--overwrite", "--steps", "2", "--checkpoint-every", "2"]) == 0  # starts over
    assert _files(run) == ["final", "latest", "log.jsonl", "notes.txt", "report.json", "step_0000002",
                                       "step_9999999"]
    assert (run / "notes.txt").read_text() == "mine"


def test_tune_prompt_and_evaluate_never_replace_the_users_files(hf_tiny, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    data = write_synthetic_folder(tmp_path / "data", 4, size=(32, 32))
    for companion in ("", ".log.jsonl", ".state.safetensors"):
        target = tmp_path / f"p{len(companion)}.safetensors"
        (tmp_path / (target.name + companion)).write_text("mine")
        for extra in ([], ["--overwrite"]):
            code = main(["tune-prompt", data, "--model", model, "-o", str(target), "--steps", "1", "--batch-size", "1",
                         *extra])
            err = capsys.readouterr().err
            assert code == 1 and "was not written by seggpt-jax" in err and "loading" not in err, err
        assert (tmp_path / (target.name + companion)).read_text() == "mine"
    report = tmp_path / "report.json"
    report.write_text("mine")
    for extra in ([], ["--overwrite"]):
        code = main(["evaluate", data, "--protocol", "folder", "--prompt-image", os.path.join(data, "images", "0000.png"),
                     "--prompt-mask", os.path.join(data, "masks", "0000.png"), "--model", model, "-o", str(report),
                     *extra])
        err = capsys.readouterr().err
        assert code == 1 and "was not written by seggpt-jax" in err and "loading" not in err, err
    assert report.read_text() == "mine"
    # its own report: replaced only with --overwrite
    own = tmp_path / "own.json"
    args = ["evaluate", data, "--protocol", "folder", "--prompt-image", os.path.join(data, "images", "0000.png"),
            "--prompt-mask", os.path.join(data, "masks", "0000.png"), "--model", model, "-o", str(own)]
    assert main(args) == 0
    assert main(args) == 1 and "pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


# ------------------------------------------------------------------------------------ prompts misread
def test_a_mask_drawn_only_in_its_alpha_channel_is_read_from_it():
    shape = np.zeros((40, 50), np.uint8)
    shape[10:30, 5:25] = 255
    shape[9, 5:25] = 128  # an anti-aliased edge
    for colour in ((255, 255, 255), (0, 0, 0), (200, 30, 30)):
        rgba = np.zeros((40, 50, 4), np.uint8)
        rgba[..., :3] = colour
        rgba[..., 3] = shape
        picture = binary_picture(Image.fromarray(rgba, "RGBA"))
        np.testing.assert_array_equal(picture, np.repeat(shape[..., None], 3, axis=-1))
        np.testing.assert_array_equal(binary_picture(rgba), picture)  # the array form alike
    grey_alpha = Image.fromarray(np.stack([np.full((40, 50), 255, np.uint8), shape], -1), "LA")
    np.testing.assert_array_equal(binary_picture(grey_alpha)[..., 0], shape)
    # a mask whose colour carries the shape is read from its colour, as the BAAI code does (alpha dropped)
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., :3] = shape[..., None]
    rgba[..., 3] = 255 - shape // 2
    np.testing.assert_array_equal(binary_picture(Image.fromarray(rgba, "RGBA"))[..., 0], shape)
    with pytest.raises(ValueError, match="only in its alpha channel"):
        prompt_picture(Image.fromarray(np.dstack([np.zeros((40, 50, 3), np.uint8), shape]), "RGBA"), 2)


def _warnings_of(mask, num_labels=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompt_picture(mask, num_labels, what="prompt mask m.png")
    return [str(c.message) for c in caught if issubclass(c.category, MaskWarning)]


def test_prompts_that_would_be_misread_are_warned_about():
    empty = np.zeros((20, 20), np.uint8)
    (message,) = _warnings_of(empty)
    assert message.startswith("prompt mask m.png") and "is empty (all black): the prompt marks nothing" in message
    assert "marks the whole image" in _warnings_of(np.full((20, 20), 255, np.uint8))[0]
    classes = np.zeros((20, 20), np.uint8)
    classes[2:8, 2:8], classes[10:18, 10:18] = 1, 2
    palette = Image.fromarray(classes, "P")
    palette.putpalette([0, 0, 0, 1, 1, 1, 2, 2, 2] + [0] * 759)  # class-id PNG with a grey palette: dark colours
    (message,) = _warnings_of(palette)
    assert "palette image of 3 indices (0, 1, 2)" in message and "--num-labels" in message
    assert "nearly black (its brightest level is 2 of 255)" in _warnings_of(classes * 1)[0]
    assert _warnings_of(palette, num_labels=2) == []  # read as class ids: fine
    assert "is empty (all background)" in _warnings_of(empty, num_labels=2)[0]
    assert "is class 1 everywhere" in _warnings_of(np.ones((20, 20), np.uint8), num_labels=2)[0]
    sensible = np.zeros((20, 20), np.uint8)
    sensible[5:15, 5:15] = 255
    assert _warnings_of(sensible) == [] and _warnings_of(sensible // 255) == []  # 0/1 masks are scaled


def test_the_command_line_says_so_once_before_the_model_loads(w, capsys):
    photo = save_image(w["tmp"] / "q.jpg", w["rng"].integers(0, 256, (30, 30, 3), dtype=np.uint8))
    classes = np.zeros((50, 50), np.uint8)
    classes[5:20, 5:20], classes[25:45, 25:45] = 1, 2
    w["mask"] = save_image(w["tmp"] / "classes.png", classes, "L")
    assert _segment(w, [photo]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "warning:" in line]
    assert len(warned) == 1 and "classes.png is nearly black" in warned[0] and "--num-labels" in warned[0]
    assert err.index("warning:") < err.index("loading")


def test_a_learned_prompt_is_used_only_in_its_own_mode(hf_tiny, tmp_path, capsys):
    from seggpt_jax import SegGptForImageSegmentation, Segmenter
    from seggpt_jax.train.prompt_tuning import LearnedPrompt

    _, model = hf_tiny("nonsquare")
    size = SegGptForImageSegmentation.from_pretrained(model).config.query_size
    prompt = LearnedPrompt(np.zeros((1, 3, *size)), np.zeros((1, 3, *size)), {"num_labels": None})
    path = str(tmp_path / "binary.safetensors")
    prompt.save(path)
    photo = save_image(tmp_path / "q.jpg", np.zeros((30, 30, 3), np.uint8))
    code = main(["segment", photo, "--learned-prompt", path, "--num-labels", "3", "--model", model, "--out-dir",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "tuned for binary masks, not 3 classes" in _error_lines(err)[0] and "loading" not in err
    with pytest.raises(ValueError, match="tuned for binary masks, not 3 classes"):
        Segmenter(SegGptForImageSegmentation.from_pretrained(model)).segment(photo, LearnedPrompt.load(path),
                                                                             num_labels=3)
    semantic = LearnedPrompt(np.zeros((1, 3, *size)), np.zeros((1, 3, *size)), {"num_labels": 3})
    semantic.save(str(tmp_path / "three.safetensors"))
    code = main(["segment", photo, "--learned-prompt", str(tmp_path / "three.safetensors"), "--model", model,
                 "--out-dir", str(tmp_path / "o")])  # its own mode without --num-labels
    assert code == 0 and "3 classes" in capsys.readouterr().out


def test_trainable_that_matches_nothing_is_refused_naming_the_paths(hf_tiny, tmp_path, capsys):
    _, model = hf_tiny("nonsquare")
    data = write_synthetic_fss(tmp_path / "fss", 2, colours=("red",), size=(32, 32))
    code = main(["finetune", data, "--data-layout", "fss1000", "--model", model, "--out-dir", str(tmp_path / "run"),
                 "--steps", "1", "--trainable", "encoder\\.blocks"])
    assert code == 1
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "'encoder\\\\.blocks' selects no parameter" in line and "model.encoder.layers.0.attention.qkv.kernel" in line
    assert "loading" not in err and not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------------------------ fail early, exit cleanly
@pytest.mark.parametrize("case", ["under a file", "under /proc", "empty", "cache under /proc", "-o under /proc"])
def test_unwritable_output_locations_fail_before_the_model_loads(w, capsys, case):
    photo = save_image(w["tmp"] / "q.jpg", np.zeros((20, 20, 3), np.uint8))
    (w["tmp"] / "file").write_text("x")
    if case == "-o under /proc":
        data = write_synthetic_folder(w["tmp"] / "d", 2, size=(32, 32))
        code = main(["evaluate", data, "--protocol", "folder", "--prompt-image", w["prompt"], "--prompt-mask",
                     w["mask"], "--model", w["model"], "-o", "/proc/seggpt-jax/report.json"])
    else:
        out = {"under a file": str(w["tmp"] / "file" / "out"), "under /proc": "/proc/seggpt-jax-out", "empty": ""}
        extra = ["--compilation-cache", "/proc/seggpt-jax-cache"] if case == "cache under /proc" else []
        code = _segment(w, [photo], *extra, out=out.get(case, w["out"]))
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert code == 1 and len(lines) == 1 and "loading" not in err, err
    assert any(word in lines[0] for word in ("not writable", "not a folder", "is empty")), lines[0]


def test_an_mp4_without_a_video_stream_is_one_line(w, capsys):
    av = pytest.importorskip("av")
    path = str(w["tmp"] / "sound.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    code = main(["video", path, "--prompt-mask", w["mask"], "--out-dir", w["out"], "--model", w["model"]])
    err = capsys.readouterr().err
    assert code == 1 and "holds no video stream" in _error_lines(err)[0] and "Traceback" not in err


def test_images_over_the_pixel_limit_are_refused_from_the_header(w, capsys):
    photo = save_image(w["tmp"] / "wide.png", np.zeros((10, 300, 3), np.uint8))
    small = save_image(w["tmp"] / "small.png", np.zeros((10, 10, 3), np.uint8))
    assert _segment(w, [photo, small], "--max-pixels", "1000") == 1
    out = capsys.readouterr().out
    assert "wide.png is 300x10 (0 megapixels), over the limit of 0.001 megapixels (--max-pixels)" in out
    assert "segmented 1 of 2 images" in out


BIG_QUERY = """
import resource, sys
import numpy as np
from PIL import Image
from seggpt_jax.cli import main
size, big, small, out, rest = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
picture = np.zeros((size, size, 3), np.uint8)
picture[size // 4:3 * size // 4, size // 6:5 * size // 6] = (200, 60, 30)
Image.fromarray(picture).save(big, compress_level=1)
del picture
assert main(["segment", small, "--out-dir", out + "-warm", *rest]) == 0  # JAX, the model, the compiled forward
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
code = main(["segment", big, "--out-dir", out, *rest])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("EXTRA", max(0, after - before), "CODE", code)
"""


def test_a_12000_pixel_square_query_stays_within_its_documented_memory(w):
    """12000 x 12000 (144 megapixels) is under the default --max-pixels; its documented bound is
    :data:`~seggpt_jax.imaging.decode.BYTES_PER_QUERY_PIXEL` bytes per pixel beyond what the process
    held before (peak RSS; measured 11.4)."""
    from seggpt_jax.imaging.decode import BYTES_PER_QUERY_PIXEL, DEFAULT_MAX_PIXELS

    size = 12000
    assert size * size <= DEFAULT_MAX_PIXELS
    small = save_image(w["tmp"] / "small.png", np.zeros((30, 30, 3), np.uint8))
    result = subprocess.run([sys.executable, "-c", BIG_QUERY, str(size), str(w["tmp"] / "big.png"), small, w["out"],
                             "--prompt-image", w["prompt"], "--prompt-mask", w["mask"], "--model", w["model"]],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0 and "CODE 0" in result.stdout, result.stderr
    extra = int(result.stdout.split("EXTRA")[1].split()[0])
    print(f"12000 x 12000 query: peak RSS rose {extra / 2**30:.2f} GiB, {extra / (size * size):.1f} bytes per pixel")
    assert extra <= BYTES_PER_QUERY_PIXEL * size * size, extra / (size * size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own output, read back
        assert Image.open(os.path.join(w["out"], "big.png_mask.png")).size == (size, size)


def _console(args, **kwargs):
    return subprocess.Popen([CONSOLE_SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, **kwargs)


def test_ctrl_c_at_any_moment_exits_130_never_abort(w, tmp_path):
    """20 tries, interrupted at random moments of the first seconds (importing, loading, compiling in the
    background, waiting for it, segmenting): each ends with 130 (or 0 when it finished first), never
    SIGABRT (134, "terminate called")."""
    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(6):
        save_image(photos / f"{i}.png", w["rng"].integers(0, 256, (40, 40, 3), dtype=np.uint8))
    random.seed(0)
    codes = []
    for wave in range(5):
        procs = []
        for j in range(4):
            args = ["segment", str(photos), "--prompt-image", w["prompt"], "--prompt-mask", w["mask"], "--out-dir",
                    str(tmp_path / f"o{wave}{j}"), "--model", w["model"]]
            procs.append((_console(args), random.uniform(0.3, 4.0)))
        start = time.monotonic()
        for proc, delay in sorted(procs, key=lambda p: p[1]):
            time.sleep(max(0.0, start + delay - time.monotonic()))
            proc.send_signal(signal.SIGINT)
        for proc, _ in procs:
            _, err = proc.communicate(timeout=120)
            codes.append(proc.returncode)
            # 130: stopped; 0: finished first; -SIGINT: it arrived while Python was exiting after finishing
            assert proc.returncode in (0, 130, -signal.SIGINT), (proc.returncode, err)
            assert "Traceback" not in err and "terminate called" not in err, err
    assert codes.count(130) >= 10  # most were stopped mid-way


def test_a_truncated_weight_file_is_one_line_and_a_clean_exit(w, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(w["model"]):
        data = open(os.path.join(w["model"], name), "rb").read()
        (broken / name).write_bytes(data[: len(data) // 2] if name.endswith(".safetensors") else data)
    photo = save_image(tmp_path / "q.jpg", np.zeros((20, 20, 3), np.uint8))
    for attempt in range(3):
        proc = _console(["segment", photo, "--prompt-image", w["prompt"], "--prompt-mask", w["mask"], "--out-dir",
                         str(tmp_path / f"o{attempt}"), "--model", str(broken)])
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err
        assert len(_error_lines(err)) == 1 and "terminate called" not in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------ resume
def _complete(folder_path, names):
    folder = OutputFolder(folder_path)
    return {n for n in names if folder.owns(f"{n}_mask.png") and folder.owns(f"{n}_overlay.png")}


def test_interrupted_runs_resume_to_exactly_one_uninterrupted_run(w, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    names = [f"{i:02d}.png" for i in range(8)]
    for i, name in enumerate(names):
        save_image(photos / name, w["rng"].integers(0, 256, (20 + 3 * i, 30, 3), dtype=np.uint8))
    reference = str(tmp_path / "reference")
    start = time.perf_counter()
    assert _segment(w, [str(photos)], out=reference) == 0
    duration = time.perf_counter() - start
    expected = _digests(reference)
    rng = random.Random(1)

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        for attempt in range(10):
            out = str(tmp_path / f"run{attempt}")
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.05, duration))
            try:
                first = _segment(w, [str(photos)], out=out)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert first in (0, 130), capsys.readouterr()
            done_before = _complete(out, names)
            stamps = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in _files(out)}
            capsys.readouterr()
            assert _segment(w, [str(photos)], out=out) == 0
            printed = capsys.readouterr().out
            assert f"segmented {len(names) - len(done_before)} of 8 images" in printed
            if done_before:
                assert f"{len(done_before)} already done (skipped)" in printed
            assert _digests(out) == expected
            for name in done_before:  # finished inputs are not processed again
                for kind in ("mask", "overlay"):
                    f = f"{name}_{kind}.png"
                    assert os.stat(os.path.join(out, f)).st_mtime_ns == stamps[f]
            assert not [f for f in os.listdir(out) if f.startswith(".partial")]
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_a_rerun_completes_half_written_pairs_and_refuses_other_settings(w, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        save_image(photos / f"{i}.png", w["rng"].integers(0, 256, (24, 24, 3), dtype=np.uint8))
    assert _segment(w, [str(photos)]) == 0
    expected = _digests(w["out"])
    os.remove(os.path.join(w["out"], "1.png_overlay.png"))  # as if stopped between the two writes
    capsys.readouterr()
    assert _segment(w, [str(photos)]) == 0
    printed = capsys.readouterr().out
    assert "segmented 1 of 3 images" in printed and "2 already done" in printed and "wrote 1 file " in printed
    assert _digests(w["out"]) == expected
    assert _segment(w, [str(photos)], "--embedding-type", "semantic") == 1  # other settings: never taken as done
    printed = capsys.readouterr().out
    assert "3 inputs failed" in printed and "from an earlier run with other settings" in printed
    assert _digests(w["out"]) == expected
    assert _segment(w, [str(photos)], "--embedding-type", "semantic", "--overwrite") == 0  # redoes everything
    assert "segmented 3 of 3 images" in capsys.readouterr().out
    records = [json.loads(line) for line in open(os.path.join(w["out"], MANIFEST))]
    assert all(r.get("job") and r.get("source") for r in records)


def test_every_output_is_recorded_before_it_appears(tmp_path):
    """An output that exists is known to be the tool's, whenever the run stops (the record comes first)."""
    folder = OutputFolder(tmp_path / "o")
    seen = []

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("data")

    import seggpt_jax.files as files

    real = os.replace

    def spy(src, dst):
        seen.append((os.path.basename(dst), OutputFolder(tmp_path / "o")._records.get(os.path.basename(dst))))
        real(src, dst)

    files.os.replace = spy
    try:
        folder.write("a.txt", write)
    finally:
        files.os.replace = real
    (name, records), = seen
    assert name == "a.txt" and records and records[-1].size == 4
    assert folder.owns("a.txt")


def test_ctrl_c_inside_jits_static_argument_comparison_is_an_interrupt(monkeypatch, capsys):
    """JAX turns a KeyboardInterrupt raised while it compares static arguments into a ValueError holding the
    interrupt's traceback as text; the command line still reports it as Ctrl-C (130), not as an error."""
    import jax

    from seggpt_jax.cli import segment

    class Interrupting:
        def __eq__(self, other):
            raise KeyboardInterrupt

        def __hash__(self):
            return 1

    jitted = jax.jit(lambda flag, x: x, static_argnums=0)
    jitted(Interrupting(), 1.0)

    def run(args):
        return jitted(Interrupting(), 1.0)

    monkeypatch.setattr(segment, "run_segment", run)
    parser_run = main(["segment", "x.jpg", "--prompt-image", "p", "--prompt-mask", "m", "--out-dir", "o"])
    assert parser_run == 130 and "interrupted" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ one surface
def _options(command):
    from seggpt_jax.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {option: action for action in sub._actions for option in action.option_strings}, sub


@pytest.mark.parametrize("command, option", [("video", "--context-frames"), ("finetune", "--seed"),
                                             ("evaluate", "--fold"), ("tune-prompt", "--seed")])
def test_every_default_is_shown_zero_included(command, option, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    after = text[text.rindex(option):]  # its help entry, after the usage lines
    assert "(default: 0)" in after[:400], after[:400]


@pytest.mark.parametrize("command", ["segment", "video", "finetune", "tune-prompt", "evaluate", "convert", "export",
                                     "info", "serve"])
def test_every_command_that_takes_a_model_takes_model(command):
    options, _ = _options(command)
    assert "--model" in options


@pytest.mark.parametrize("command", ["segment", "video", "finetune", "tune-prompt", "evaluate", "convert", "export"])
def test_every_command_that_writes_takes_overwrite(command):
    assert "--overwrite" in _options(command)[0]


@pytest.mark.parametrize("command", ["segment", "video", "finetune", "tune-prompt", "evaluate", "convert", "serve"])
def test_every_command_that_compiles_takes_a_compilation_cache(command):
    assert "--compilation-cache" in _options(command)[0]


def test_a_positional_model_or_model_but_not_both(hf_tiny, capsys):
    _, model = hf_tiny("nonsquare")
    assert main(["info", "--model", model]) == 0 and "parameters" in capsys.readouterr().out
    assert main(["info", model, "--model", model]) == 1
    assert "give the model as MODEL or --model, once" in capsys.readouterr().err
    assert main(["info"]) == 1 and "give the model: MODEL (or --model)" in capsys.readouterr().err
