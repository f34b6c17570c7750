"""XLA's temporary memory and the time of the ViT-L forward, unscanned vs ``scan_layers=True``.

    python -m benchmarks.scan_memory [--time 3] [--batch 1] [--json OUT]

For each layout the forward (float32, one prompt, the default attention) is lowered and compiled for an
abstract model built with ``nnx.eval_shape`` (no weights), and the compiled program's
``memory_analysis()`` is printed: ``temp`` (XLA's temporaries), ``arguments`` (the weights and the
inputs). A scanned model's parameters are stored stacked, so its forward should need no more
temporaries than the unscanned one; before they were, it stacked 1.08 GiB of weights on every call.

``--time N`` also runs each forward N times on random weights (after one warm-up call), alternating
the two layouts, and prints the seconds and the median ratio of each pair; it holds both models
(about 4 GB) and takes, on 2 CPU cores, 10 s or more per forward.
``--train POLICY`` also compiles the Trainer's step (batch 1, that remat policy) and prints its
temporaries (:func:`seggpt_jax.train.estimate_memory`; a minute or more per layout on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=int, default=0, help="timed forwards per layout (0: memory only)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--train", default=None, metavar="POLICY",
                        help="also the compiled training step's temporaries with this remat policy (e.g. dots)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    from seggpt_jax import RuntimeConfig, SegGptConfig, SegGptForImageSegmentation
    from seggpt_jax.nn.inputs import prepare
    from seggpt_jax.nn.models import _forward_jit

    config = SegGptConfig.vit_large()
    zeros = np.zeros((args.batch, config.num_channels, *config.query_size), np.float32)
    inputs, options = prepare(config, zeros, zeros, zeros)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
               "jax": jax.__version__, "batch": args.batch, "train_remat_policy": args.train, "layouts": {}}
    forwards = {}
    for scan in (False, True):
        runtime = RuntimeConfig(scan_layers=scan)
        abstract = nnx.eval_shape(lambda: SegGptForImageSegmentation(config, runtime=runtime, rngs=nnx.Rngs(0)))
        start = time.perf_counter()
        compiled = _forward_jit.lower(*nnx.split(abstract), inputs, options).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        row = {"temp_bytes": int(memory.temp_size_in_bytes), "argument_bytes": int(memory.argument_size_in_bytes),
               "output_bytes": int(memory.output_size_in_bytes), "compile_s": round(compile_s, 1)}
        if args.time:
            model = SegGptForImageSegmentation(config, runtime=runtime, rngs=nnx.Rngs(0))
            graphdef, state = nnx.split(model)
            jax.block_until_ready(_forward_jit(graphdef, state, inputs, options))  # compiles again, warms up
            forwards[scan] = (graphdef, state)
        if args.train:
            from seggpt_jax.train import estimate_memory

            start = time.perf_counter()
            row["train_temp_bytes"] = estimate_memory(config, 1, remat_policy=args.train, runtime=runtime).temp_bytes
            row["train_compile_s"] = round(time.perf_counter() - start, 1)
        results["layouts"]["scanned" if scan else "unscanned"] = row
        print(f"scan_layers={scan}: temp {row['temp_bytes'] / 2**30:.3f} GiB, arguments "
              f"{row['argument_bytes'] / 2**30:.3f} GiB, compile {row['compile_s']} s"
              + (f", training step ({args.train}) temp {row['train_temp_bytes'] / 2**30:.3f} GiB" if args.train else ""),
              flush=True)
    if args.time:  # alternating, so that a shared machine's changing load falls on both alike
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.time):
            for scan, (graphdef, state) in forwards.items():
                start = time.perf_counter()
                jax.block_until_ready(_forward_jit(graphdef, state, inputs, options))
                times[scan].append(time.perf_counter() - start)
        for scan, row in ((False, results["layouts"]["unscanned"]), (True, results["layouts"]["scanned"])):
            row["forward_s"] = [round(t, 2) for t in times[scan]]
            row["forward_median_s"] = round(statistics.median(times[scan]), 2)
        ratios = [b / a for a, b in zip(times[False], times[True])]
        results["scanned_over_unscanned_median"] = round(statistics.median(ratios), 3)
        print(f"forward seconds, alternating: unscanned {results['layouts']['unscanned']['forward_s']}, scanned "
              f"{results['layouts']['scanned']['forward_s']}; scanned/unscanned per pair, median "
              f"{results['scanned_over_unscanned_median']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
