"""Each flash kernel, compiled for real GPUs without one (``benchmarks/kernel_resources.py``): the
Triton IR from our own cuda lowering, compiled by the PyPI ``triton`` package and assembled by its
``ptxas`` for sm_80 (A100) and sm_90a (H100), bfloat16 and float32 at the default precision, default
blocks at the ViT-L grid. Compiled once per session (about 25 s on 2 cores)."""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("triton")

from benchmarks import kernel_resources  # noqa: E402


@functools.lru_cache(maxsize=None)
def rows() -> tuple[dict, ...]:
    return tuple(kernel_resources.measure())


def test_every_kernel_compiles_for_both_archs_and_dtypes():
    seen = {(r["kernel"], r["dtype"], r["arch"]) for r in rows()}
    assert seen == {(k, d, a) for k in ("fwd", "dq", "dkv") for d in ("bfloat16", "float32")
                    for a in ("sm_80", "sm_90a")}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_defaults_fit_without_spills_on_tensor_cores(dtype, arch):
    for r in (r for r in rows() if r["dtype"] == dtype and r["arch"] == arch):
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["shared_bytes"] <= kernel_resources.SHARED_LIMIT[arch], r
        assert r["registers"] <= 255, r
        assert r["matmuls"] > 0 and r["mma"] != "fma", r  # every kernel has matmuls, all on tensor cores
        if arch == "sm_90a":
            assert r["mma"] == "wgmma", r  # 64-row tiles: Hopper's warpgroup MMA in every kernel
