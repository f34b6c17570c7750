"""The ViT-L forward against XLA's float32 matmul floor on this CPU, for each chunked-attention tile size.

    python -m benchmarks.cpu_tile [--rows 7 14 28 56] [--repeats 3] [--json OUT]

One run, one process, measures both sides of the ratio:

* the floor: the forward's FLOPs (``benchmarks.benchmark.forward_flops``, 1.59 TFLOP for ViT-L at
  batch 1) at the float32 matmul rate XLA reaches here (``benchmarks.benchmark.matmul_rate``: a 4096 x
  4096 x 4096 matmul, best of ``--repeats``, measured before and after the forwards; the higher rate is
  kept, so the floor is the lower one);
* the forward (float32, one prompt, random weights, ``attention="chunked"``) with at most
  ``rows x 28`` queries per attention tile (``RuntimeConfig(cpu_tile_queries=...)``), each tile size
  timed ``--repeats`` times after a warm-up call, the sizes taken in turn so that a shared machine's
  changing load falls on all of them alike.

It prints, per tile size, the median forward, the floor / forward ratio (the utilisation), and which
tile the execution plan picks on this machine (:func:`seggpt_jax.runtime.cpu_tile_queries`). The
plan's table (:data:`seggpt_jax.runtime.CPU_TILE_QUERIES`) should hold the fastest size of each kind of
machine (:func:`seggpt_jax.runtime.cpu_kind`, printed first); on a kind it does not list, run this and
pass the fastest as ``RuntimeConfig(cpu_tile_queries=...)``. It holds one ViT-L model (1.2 GB) and
takes 2-4 minutes on 2 cores.

``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` caps only the code XLA generates itself: the matmuls run in
XNNPACK/YNNPACK, which picks its kernels from the CPU it finds, so that is no stand-in for an AVX2-only
machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics

from benchmarks.benchmark import forward_flops, matmul_rate, timed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[7, 14, 28, 56],
                        help="grid rows per attention tile to time (each must divide the 56 rows)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    from seggpt_jax import RuntimeConfig, SegGptConfig, SegGptForImageSegmentation
    from seggpt_jax.nn.chunked_attention import default_tile_rows
    from seggpt_jax.runtime import cpu_kind, cpu_tile_queries

    config = SegGptConfig.vit_large()
    rows, cols = config.grid_size
    for r in args.rows:
        if r < 1 or rows % r:
            parser.error(f"--rows {r} does not divide the {rows} grid rows")
    flops = forward_flops(config, 1)
    rates = [matmul_rate(4096, repeats=args.repeats)]
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal((1, 3, *config.query_size), dtype=np.float32)
              for name in ("pixel_values", "prompt_pixel_values", "prompt_masks")}
    base = SegGptForImageSegmentation(config, runtime=RuntimeConfig(attention="chunked"), rngs=nnx.Rngs(0))
    models = {r: base.with_runtime(cpu_tile_queries=r * cols) for r in args.rows}
    forwards = {r: (lambda model=model: jax.block_until_ready(model(**inputs).pred_masks))
                for r, model in models.items()}
    compile_s = {r: timed(forward, 1)[0] for r, forward in forwards.items()}
    times: dict[int, list[float]] = {r: [] for r in args.rows}
    for _ in range(args.repeats):  # the sizes in turn: a shared machine's changing load falls on all alike
        for r, forward in forwards.items():
            times[r] += timed(forward, 1)
    rates.append(matmul_rate(4096, repeats=args.repeats))
    rate = max(rates)
    floor = flops / rate
    planned = cpu_tile_queries()
    planned_rows = default_tile_rows(rows, cols, max_queries=planned)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
               "cpu_kind": cpu_kind(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "cores": os.cpu_count(),
               "load_average": os.getloadavg(), "jax": jax.__version__, "forward_tflop": flops / 1e12,
               "matmul_tflop_s": [x / 1e12 for x in rates], "floor_s": floor,
               "planned_tile_queries": planned, "planned_rows": planned_rows, "tiles": {}}
    print(f"cpu kind {results['cpu_kind']} (XLA_FLAGS={results['xla_flags']!r}), {os.cpu_count()} cores; "
          f"float32 matmul {rate / 1e9:.0f} GFLOP/s (runs: {', '.join(f'{x / 1e9:.0f}' for x in rates)}); "
          f"floor {floor:.2f} s for {flops / 1e12:.2f} TFLOP")
    print("| rows per tile | queries | first call (s) | forward median (s) | all (s) | floor / forward |")
    print("|---|---|---|---|---|---|")
    for r in args.rows:
        median = statistics.median(times[r])
        results["tiles"][r] = {"queries": r * cols, "first_call_s": compile_s[r], "median_s": median,
                               "all_s": times[r], "utilisation": floor / median}
        mark = " (plan)" if r == planned_rows else ""
        print(f"| {r}{mark} | {r * cols} | {compile_s[r]:.1f} | {median:.2f} | "
              f"{', '.join(f'{t:.2f}' for t in times[r])} | {floor / median:.0%} |")
    best = min(args.rows, key=lambda r: results["tiles"][r]["median_s"])
    results["fastest_rows"] = best
    print(f"fastest: {best} rows ({best * cols} queries); the plan picks {planned_rows} rows "
          f"(cpu_tile_queries {planned} for {results['cpu_kind']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
