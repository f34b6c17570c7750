"""Big jobs: ``segment --inputs-from/--shard`` (independent workers), a SIGINT mid-run and the rerun that
resumes it, and 2-process ``jax.distributed`` runs of ``segment`` and ``finetune`` on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import free_port, result_lines, run_processes, save_image

from seggpt_jax.cli import main

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "seggpt-jax")
WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers")


@pytest.fixture
def job(hf_tiny, tmp_path):
    _, model = hf_tiny("nonsquare")
    rng = np.random.default_rng(5)
    photos = tmp_path / "photos"
    photos.mkdir()
    more = tmp_path / "more"
    more.mkdir()
    for i in range(7):
        save_image(photos / f"p{i}.jpg", rng.integers(0, 256, (30 + 4 * i, 40, 3), dtype=np.uint8))
    for i in range(4):
        save_image(more / f"m{i}.png", rng.integers(0, 256, (25, 30 + 5 * i, 3), dtype=np.uint8))
    save_image(tmp_path / "single.png", rng.integers(0, 256, (33, 21, 3), dtype=np.uint8))
    prompt = save_image(tmp_path / "prompt.png", rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    mask = np.zeros((50, 50), np.uint8)
    mask[10:30, 15:40] = 255
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# a job list\n{photos}/*.jpg\n\n{more}\n{tmp_path / 'single.png'}\n{tmp_path / 'gone.png'}\n")
    return dict(model=model, photos=str(photos), list=str(listing), prompt=prompt,
                mask=save_image(tmp_path / "prompt_mask.png", mask, "L"), tmp=tmp_path, count=12)


def _args(j, out, *extra):
    return ["segment", "--inputs-from", j["list"], "--prompt-image", j["prompt"], "--prompt-mask", j["mask"],
            "--out-dir", str(out), "--model", j["model"], *extra]


def _digests(folder) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if not name.startswith(".")}


def _summary(text: str) -> tuple[int, int, int, int]:
    match = re.search(r"summary: (\d+) done \((\d+) segmented, (\d+) skipped\), (\d+) failed", text)
    assert match, text
    return tuple(int(g) for g in match.groups())


def test_two_shards_give_exactly_the_outputs_of_one_unsharded_run(job, capsys, monkeypatch):
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    whole, sharded = job["tmp"] / "whole", job["tmp"] / "sharded"
    assert main(_args(job, whole)) == 1  # the list's missing file is a failed input; the others are written
    out = capsys.readouterr().out
    assert _summary(out) == (job["count"], job["count"], 0, 1) and "gone.png" in out and "images/s" in out
    counts = []
    for index in range(2):
        assert main(_args(job, sharded, "--shard", f"{index}/2")) in (0, 1)
        counts.append(_summary(capsys.readouterr().out))
    assert sum(c[0] for c in counts) == job["count"] and all(c[0] > 0 for c in counts)  # both did some work
    assert _digests(sharded) == _digests(whole)
    records = sorted(n for n in os.listdir(sharded) if n.startswith(".seggpt-jax-outputs"))
    assert records == [".seggpt-jax-outputs.shard-0-of-2.jsonl", ".seggpt-jax-outputs.shard-1-of-2.jsonl"]

    # a retried shard that is already finished exits 0 and does nothing (SLURM's numbers select it)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    code = main(_args(job, sharded))
    done, segmented, skipped, _ = _summary(capsys.readouterr().out)
    assert (done, segmented, skipped) == (counts[1][0], 0, counts[1][0]) and code in (0, 1)
    # an unsharded rerun over the shards' outputs finds everything done
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.delenv("SLURM_NTASKS")
    main(_args(job, sharded))
    assert _summary(capsys.readouterr().out)[:3] == (job["count"], 0, job["count"])


def test_shard_environment_and_bad_values(monkeypatch):
    from seggpt_jax.cli.segment import parse_shard
    from seggpt_jax.parallel import shard_from_environment, shard_of

    assert shard_from_environment({"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}) == (3, 8)
    assert shard_from_environment({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8",
                                   "SLURM_ARRAY_TASK_MIN": "1"}) == (7, 8)
    assert shard_from_environment({"JOB_COMPLETION_INDEX": "2", "JOB_COMPLETIONS": "4"}) == (2, 4)
    assert shard_from_environment({"JOB_COMPLETION_INDEX": "2"}) is None  # no count: not sharded
    assert shard_from_environment({}) is None
    assert {shard_of(f"{i}.jpg", 4) for i in range(100)} == {0, 1, 2, 3}
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(Exception, match="I/N"):
            parse_shard(bad)


def test_sigint_mid_run_then_a_rerun_redoes_only_what_was_not_finished(job, tmp_path):
    """A real process stopped with SIGINT once a few inputs are written; the rerun skips every finished
    input (counted by its summary, and their files untouched) and ends with one uninterrupted run's outputs."""
    big = tmp_path / "big"
    big.mkdir()
    rng = np.random.default_rng(9)
    for i in range(40):
        save_image(big / f"b{i:02d}.png", rng.integers(0, 256, (60 + i, 50, 3), dtype=np.uint8))
    listing = tmp_path / "big.txt"
    listing.write_text(f"{big}\n")
    j = dict(job, list=str(listing))
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert main(_args(j, reference)) == 0
    proc = subprocess.Popen([CONSOLE_SCRIPT, *_args(j, out), "--batch-size", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and sum(name.endswith("_overlay.png") for name in os.listdir(out)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    finished = {n[:-len("_overlay.png")] for n in os.listdir(out) if n.endswith("_overlay.png")}
    finished &= {n[:-len("_mask.png")] for n in os.listdir(out) if n.endswith("_mask.png")}
    assert 3 <= len(finished) < 40
    stamps = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if not n.startswith(".")}
    result = subprocess.run([CONSOLE_SCRIPT, *_args(j, out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    done, segmented, skipped, failed = _summary(result.stdout)
    assert (done, skipped, failed) == (40, len(finished), 0) and segmented == 40 - len(finished)
    assert _digests(out) == _digests(reference)
    for name in finished:
        for kind in ("_mask.png", "_overlay.png"):
            assert os.stat(out / (name + kind)).st_mtime_ns == stamps[name + kind]  # not processed again
    assert not [n for n in os.listdir(out) if n.startswith(".partial") or n.startswith(".staging")]



def _finetune_data(root, rng):
    os.makedirs(root / "images")
    os.makedirs(root / "masks")
    for i in range(6):
        save_image(root / "images" / f"{i}.png", rng.integers(0, 256, (36, 30, 3), dtype=np.uint8))
        save_image(root / "masks" / f"{i}.png", (rng.random((36, 30)) > 0.5).astype(np.uint8) * 255, "L")


def _fss_data(root, rng):
    for name in ("cat", "dog"):
        os.makedirs(root / name)
        for i in range(1, 4):
            save_image(root / name / f"{i}.jpg", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            save_image(root / name / f"{i}.png", (rng.random((32, 32)) > 0.5).astype(np.uint8) * 255, "L")


def test_two_processes_segment_finetune_tune_and_evaluate_like_one(job, tmp_path):
    sys.path.insert(0, WORKERS)
    from distributed_cli import EVALUATE, FINETUNE, TUNE

    work = tmp_path / "work"
    work.mkdir()
    os.symlink(job["model"], work / "model")
    os.symlink(job["photos"], work / "photos")
    os.symlink(job["prompt"], work / "prompt.png")
    os.symlink(job["mask"], work / "prompt_mask.png")
    _finetune_data(work / "data", np.random.default_rng(4))
    _fss_data(work / "fss", np.random.default_rng(6))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([WORKERS, os.environ.get("PYTHONPATH", "")]))
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        env.pop(name, None)
    one = subprocess.run([CONSOLE_SCRIPT, "segment", str(work / "photos"), "--prompt-image", str(work / "prompt.png"),
                          "--prompt-mask", str(work / "prompt_mask.png"), "--out-dir", str(work / "one-segment"),
                          "--model", str(work / "model")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    one = subprocess.run([CONSOLE_SCRIPT, "finetune", str(work / "data"), "--out-dir", str(work / "one-finetune"),
                          "--model", str(work / "model"), *FINETUNE], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    for command in (["tune-prompt", str(work / "data"), "-o", str(work / "one-prompt.safetensors"), *TUNE],
                    ["evaluate", str(work / "fss"), "-o", str(work / "one-report.json"), *EVALUATE]):
        one = subprocess.run([CONSOLE_SCRIPT, *command, "--model", str(work / "model")], capture_output=True,
                             text=True, env=env, timeout=300)
        assert one.returncode == 0, one.stderr[-2000:]
    port = free_port()
    outputs = run_processes([[sys.executable, os.path.join(WORKERS, "distributed_cli.py"), str(port), str(i), "2",
                              str(work)] for i in range(2)], env)
    results = result_lines(outputs)
    assert sorted(r["process"] for r in results) == [0, 1] and all(r["processes"] == 2 for r in results)
    assert all(r["codes"] == [0, 0, 0, 0] for r in results), results
    # segment: each process wrote its own inputs (its own record file); together, the one-process outputs
    assert _digests(work / "dist-segment") == _digests(work / "one-segment")
    records = sorted(n for n in os.listdir(work / "dist-segment") if n.startswith(".seggpt-jax-outputs"))
    assert records == [".seggpt-jax-outputs.shard-0-of-2.jsonl", ".seggpt-jax-outputs.shard-1-of-2.jsonl"]
    assert sum(_summary(out)[1] for out, _ in outputs) == 7
    # finetune: written once (by process 0), and equal to the one-process run up to float reassociation
    from seggpt_jax.weights import read_safetensors

    ours, _ = read_safetensors(str(work / "dist-finetune" / "final" / "model.safetensors"))
    theirs, _ = read_safetensors(str(work / "one-finetune" / "final" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours) <= 2e-5
    log = [json.loads(line) for line in open(work / "dist-finetune" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert sorted(n for n in os.listdir(work / "dist-finetune") if n.startswith("step_")) == \
        ["step_0000002", "step_0000003"]
    assert "fine-tuned 3 steps" in outputs[0][0] and "fine-tuned" not in outputs[1][0]
    # tune-prompt: the same prompt; evaluate: every episode scored once over both processes, one report
    ours, _ = read_safetensors(str(work / "dist-prompt.safetensors"))
    theirs, _ = read_safetensors(str(work / "one-prompt.safetensors"))
    assert max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours) <= 1e-5
    ours, theirs = (json.load(open(work / f"{kind}-report.json")) for kind in ("dist", "one"))
    assert ours["episodes"] == theirs["episodes"] > 0
    for key in ("mIoU", "FB-IoU"):
        assert abs(ours[key] - theirs[key]) <= 1e-9
    assert ours["class_IoU"].keys() == theirs["class_IoU"].keys()
