"""The flash kernels under a device mesh (8 host CPU devices, in a worker process: the device count is
fixed before JAX starts). XLA does not partition a ``pallas_call``; the attention op wraps each kernel
in ``shard_map`` so that every device runs it on its own share of batch x heads."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers")


@functools.lru_cache(maxsize=None)
def worker_result() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([WORKERS, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, os.path.join(WORKERS, "flash_sharded.py")], capture_output=True,
                            text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_each_exported_kernel_call_holds_one_devices_share():
    """ViT-L, bfloat16, batch 8 exported for cuda: forward (1 kernel) and value_and_grad (forward, dq,
    dk/dv); every operand of every Triton call is ``[1, 16, ...]`` with the batch over 8 devices and
    ``[2, 8, ...]`` with batch over 4 and heads over 2; with partitioning off, the whole ``[8, 16]``."""
    operands = worker_result()["operands"]
    expected = {"data=8 forward": (1, [1, 16]), "data=8 value_and_grad": (3, [1, 16]),
                "data=4 model=2 value_and_grad": (3, [2, 8]), "data=8 forward, partitioning off": (1, [8, 16])}
    for case, (calls, share) in expected.items():
        assert len(operands[case]) == calls, case
        assert all(dims == share for call in operands[case] for dims in call), (case, operands[case])
        assert all(len(call) >= 4 for call in operands[case])  # q, k, v and the relative terms at least


def test_sharded_forward_and_gradients_equal_unsharded():
    errors = worker_result()["errors"]
    for mesh in ("data=8", "data=4 model=2"):
        op = errors[f"op {mesh}"]
        assert set(op) == {"loss", "q", "k", "v", "rel_pos_h", "rel_pos_w"}
        assert max(op.values()) <= 1e-5, (mesh, op)  # summation order of the tables' psum only
    painter = errors["painter data=4 model=2"]
    assert painter["shard_maps"] >= 1  # the painter's kernels did run under shard_map
    assert painter["pred_masks"] <= 1e-6 and painter["loss"] <= 1e-6, painter
    assert painter["grad"] <= 1e-5 * painter["grad_scale"], painter
