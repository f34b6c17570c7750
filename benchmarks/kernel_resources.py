"""Registers, spills, shared memory and matmul instructions of each flash kernel on real GPU targets, without a GPU.

    python -m benchmarks.kernel_resources                       # default blocks, ViT-L grid, bf16 + fp32, sm_80 + sm_90a
    python -m benchmarks.kernel_resources --precision highest   # the float32 parity mode (IEEE dots)
    python -m benchmarks.kernel_resources --blocks 64 64 32 32  # other tiles: block_q block_k block_q_bwd block_k_bwd

It lowers ``jax.value_and_grad`` of :func:`seggpt_jax.nn.flash_attention.attention_flash` for ``cuda`` at
the ViT-L shape (1 image, 16 heads, 56 x 28 grid, head dim 64) and captures the Triton IR of each of
our three kernels (forward, dq, dk/dv) from JAX's Pallas lowering, with the launch settings it passes
(``num_warps``, ``num_stages``). Each module is compiled by the PyPI ``triton`` package for sm_80 (A100)
and sm_90a (H100) and the PTX assembled by the ``ptxas`` bundled with it (``ptxas -v``): registers per
thread, spill stores and loads (bytes per thread), and the kernel's shared memory (Triton's allocation).
``mma`` is ``wgmma`` (Hopper warpgroup MMA), ``mma.sync`` (Ampere-style tensor cores) or ``fma`` (no
tensor-core instruction at all). XLA compiles the same IR with its own copy of Triton, so a figure can
differ by a few registers; spills and the choice of instruction are what this is for.

Prints a table, writes JSON rows ``{kernel, dtype, arch, shared_bytes, registers, spill_stores,
spill_loads, mma, ...}`` to ``--out`` (default ``benchmarks/results/kernel-resources-<date>.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
VIT_L_GRID, VIT_L_HEADS, VIT_L_DIM = (56, 28), 16, 64
KERNELS = {"flash_relpos_fwd": "fwd", "flash_relpos_dq": "dq", "flash_relpos_dkv": "dkv"}
ARCHS = {"sm_80": 80, "sm_90a": 90}
#: Most dynamic shared memory one block may use (CUDA programming guide, compute capabilities 8.0, 9.0).
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}
DTYPES = ("bfloat16", "float32")


def capture(dtype: str, precision: str | None = None, blocks: tuple[int, ...] | None = None,
            bias: str | None = None, warps: int = 4, stages: int = 2) -> dict[str, dict]:
    """``{kernel: {"ttir": text, "num_warps": n, "num_stages": n}}`` from our own cuda lowering."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import lowering as triton_lowering

    from seggpt_jax.nn.flash_attention import BlockSizes, attention_flash

    captured: dict[str, dict] = {}
    original = triton_lowering.lower_jaxpr_to_triton_module

    def recording(jaxpr, grid_mapping, *args, **kwargs):
        result = original(jaxpr, grid_mapping, *args, **kwargs)
        text = result.module.operation.get_asm()
        name = re.search(r"tt\.func public @(\w+)", text).group(1)
        captured[KERNELS.get(name, name)] = {"ttir": text}
        return result

    extra = {}
    if blocks:
        extra["block_sizes"] = BlockSizes(*blocks, num_warps=warps, num_stages=stages)
    if bias:
        extra["bias"] = bias
    default = BlockSizes.default("gpu", VIT_L_GRID[0] * VIT_L_GRID[1])
    launch = extra.get("block_sizes", default)
    seq = VIT_L_GRID[0] * VIT_L_GRID[1]
    token = jax.ShapeDtypeStruct((1, seq, VIT_L_HEADS, VIT_L_DIM), jnp.dtype(dtype))
    tables = (jax.ShapeDtypeStruct((2 * VIT_L_GRID[0] - 1, VIT_L_DIM), jnp.dtype(dtype)),
              jax.ShapeDtypeStruct((2 * VIT_L_GRID[1] - 1, VIT_L_DIM), jnp.dtype(dtype)))

    def loss(q, k, v, rel_pos):
        out = attention_flash(q, k, v, scale=VIT_L_DIM ** -0.5, grid=VIT_L_GRID, rel_pos=rel_pos,
                              precision=precision, platform="gpu", **extra)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    triton_lowering.lower_jaxpr_to_triton_module = recording
    try:
        jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))), platforms=["cuda"],
                          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
                          )(token, token, token, tables)
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = original
    for entry in captured.values():
        entry.update(num_warps=launch.num_warps or 4, num_stages=launch.num_stages or 3)
    return captured


def _mma(ptx: str) -> str:
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "fma"


def compile_kernel(ttir: str, arch: str, num_warps: int, num_stages: int) -> dict:
    """Compile one Triton module for ``arch`` and read its resources (module docstring)."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default; silences its notice
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory(prefix="seggpt-ttir-") as folder:
        path = os.path.join(folder, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        kernel = triton.compile(path, target=GPUTarget("cuda", ARCHS[arch], 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = kernel.asm["ptx"]
        ptx_path = os.path.join(folder, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        # the ptxas Triton itself uses for this arch, with its flags (regAllocOptLevel: its ptxas 13 workaround)
        ptxas = get_ptxas(ARCHS[arch]).path
        log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", ptx_path, "-o",
                              os.path.join(folder, "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"shared_bytes": int(kernel.metadata.shared), "registers": registers,
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)), "mma": _mma(ptx),
            "wgmma_count": len(re.findall(r"\bwgmma\.mma_async", ptx)), "mma_sync_count": len(re.findall(r"\bmma\.sync", ptx)),
            "fma": len(re.findall(r"\bfma\.rn\.f32\b", ptx)), "matmuls": len(re.findall(r"\btt\.dot\b", ttir))}


def measure(dtypes=DTYPES, archs=tuple(ARCHS), precision: str | None = None, blocks=None, bias=None, warps: int = 4,
            stages: int = 2) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for kernel, entry in capture(dtype, precision, blocks, bias, warps, stages).items():
            for arch in archs:
                row = {"kernel": kernel, "dtype": dtype, "arch": arch}
                row.update(compile_kernel(entry["ttir"], arch, entry["num_warps"], entry["num_stages"]))
                row.update(shared_limit=SHARED_LIMIT[arch], num_warps=entry["num_warps"],
                           num_stages=entry["num_stages"], precision=precision or "default")
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| kernel | dtype | arch | shared KB (limit) | registers | spill stores / loads (B) | mma | fma.rn.f32 | tt.dot |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['shared_bytes'] / 1024:.0f} "
                     f"({r['shared_limit'] // 1024}) | {r['registers']} | {r['spill_stores']} / {r['spill_loads']} | "
                     f"{r['mma']} | {r.get('fma', '')} | {r['matmuls']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--archs", nargs="+", choices=sorted(ARCHS), default=list(ARCHS))
    parser.add_argument("--precision", choices=["default", "high", "highest"], default="default",
                        help="the matmuls' precision (float32: default = TF32, highest = IEEE)")
    parser.add_argument("--blocks", type=int, nargs=4, metavar=("Q", "K", "Q_BWD", "K_BWD"),
                        help="tile sizes instead of the defaults (4 warps, 2 stages)")
    parser.add_argument("--warps", type=int, default=4, help="num_warps with --blocks")
    parser.add_argument("--stages", type=int, default=2, help="num_stages with --blocks")
    parser.add_argument("--bias", choices=["rows", "onehot"], help="relative-bias mode instead of the default")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/kernel-resources-<date>.json)")
    args = parser.parse_args(argv)
    precision = None if args.precision == "default" else args.precision
    rows = measure(args.dtypes, args.archs, precision, args.blocks, args.bias, args.warps, args.stages)
    print(table(rows))
    out = args.out or os.path.join(HERE, "results", f"kernel-resources-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": " ".join(["python -m benchmarks.kernel_resources", *(argv or sys.argv[1:])]),
                   "date": datetime.date.today().isoformat(), "rows": rows}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
