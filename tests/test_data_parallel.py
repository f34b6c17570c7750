"""The product over every local device: 8 host CPU devices against one, in one worker process (XLA's
device count is fixed before JAX starts), checked against the bounds written in seggpt_jax.parallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers")


@pytest.fixture(scope="module")
def checks() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([WORKERS, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, os.path.join(WORKERS, "data_parallel.py")], capture_output=True,
                            text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    checks = json.loads(result.stdout.strip().splitlines()[-1])["checks"]
    # XLA's SPMD partitioner says on stderr when it must gather a whole array on every device to re-split it
    checks["SPMD warnings: involuntary full rematerialization"] = [
        line[:400] for line in result.stderr.splitlines() if "Involuntary full rematerialization" in line]
    return checks


def test_segmenter_over_eight_devices_equals_one(checks):
    assert checks["devices"] == 8 and checks["default batch size"] == 8  # one query per device on CPU
    for case in ("binary, one prompt", "binary, three prompts", "semantic, one prompt", "semantic, three prompts",
                 "per-query prompts (1 to 3)"):
        assert checks[f"segment {case}: masks differ"] == 0, case
        # scores are -squared colour distances in 0..255 units (up to ~2e5): float32 rounding only
        assert checks[f"segment {case}: scores"] <= 0.05, case
    # whole queries on every device: 8 queries per forward whatever the prompt count
    assert checks["shapes run on 8 devices (rows, prompts)"] == [[8, 1], [16, 2], [24, 3]]


def test_the_servers_batcher_over_eight_devices_gives_the_same_answers(checks):
    assert checks["engine over 8 devices: mask pixels that differ from Segmenter(devices=1)"] == 0
    # --max-batch 12 rows: 12 queries of one prompt (buckets 1, 2, 4, 8, 12 rounded up to multiples of 8), 6 of two
    assert checks["engine buckets (queries) by prompt count"] == {"1": [8, 16], "2": [8]}
    assert all(bucket % 8 == 0 and size <= bucket for _, size, bucket in checks["engine batches (prompts, size, bucket)"])


@pytest.mark.parametrize("weights", ["replicated", "fsdp"])
def test_a_training_step_over_eight_devices_equals_one(checks, weights):
    """Bound (seggpt_jax.parallel): the gradient all-reduce reassociates float32 sums, a relative error
    of order (rows + log2 devices) * 2**-24; the updates of two AdamW steps at lr 1e-3 carry it."""
    assert checks[f"{weights}: parameter split over devices"] == (weights == "fsdp")
    assert checks[f"{weights}: loss"] <= 1e-6
    assert checks[f"{weights}: step loss"] <= 1e-6
    assert checks[f"{weights}: gradients (relative to their scale)"] <= 1e-5
    assert checks[f"{weights}: parameters after 2 AdamW steps (lr 1e-3)"] <= 2e-5
    # the updated state keeps the layout the step was compiled for (fsdp's updates did not, once)
    assert checks[f"{weights}: programs compiled by the second step"] == 0
    # each device attends over its own rows (nn.attention.chunked_over_mesh): no activation is gathered (the
    # whole batch's per-head q, k and v were, once); fsdp gathers its split weights, replicated nothing
    assert checks[f"{weights}: gathered arrays that are not parameters"] == []
    assert (checks[f"{weights}: arrays gathered in the step"] > 0) == (weights == "fsdp")


def test_no_activation_is_gathered_whole_on_every_device(checks):
    """With fsdp weights the decoder's first matmul came out split like its weight, and the unpatchify
    after it made XLA gather the whole activation on every device (seggpt_jax.nn.ops.batch_sharded)."""
    assert checks["SPMD warnings: involuntary full rematerialization"] == []


def test_rows_of_a_batch_load_alone_and_fsdp_checkpoints_gather(checks):
    assert checks["a batch's rows equal its rows loaded alone"] is True
    assert checks["fsdp checkpoint restores the parameters"] == 0.0


def test_prompt_tuning_over_eight_devices_equals_one(checks):
    assert checks["tune_prompt: learned prompt"] <= 1e-5
