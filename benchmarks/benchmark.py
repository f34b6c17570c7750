"""seggpt-jax vs transformers on identical ViT-L weights and inputs: speed, compile time, memory, parity.

    python -m benchmarks.benchmark                      # CPU, float32 (add --torch-compile to time it too)
    python -m benchmarks.benchmark --device gpu         # GPU: ours in bfloat16 (float32 params), batch >= 32

One run of this script measures everything side by side on one machine. transformers writes a
random-weight ViT-L checkpoint once (``--workdir``); both sides load those weights and get the same
inputs. Each measurement runs in a fresh worker process of this script, so peak memory (VmHWM) and
cold compiles are the process's own. Results go to ``--out`` as JSON and a markdown table.
Needs the test extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
INPUT_NAMES = ("pixel_values", "prompt_pixel_values", "prompt_masks")


# ----------------------------------------------------------------------------------------- helpers
def peak_memory_bytes() -> int:
    """This process image's peak resident memory (VmHWM; ru_maxrss would include the parent's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def forward_flops(config, batch: int) -> float:
    """Multiply-adds x 2 of one painter forward (ours and transformers' are the same computation)."""
    c, rows, cols, p = config.hidden_size, *config.grid_size, config.patch_size
    n = rows * cols
    d = config.decoder_hidden_size
    per_layer = 2 * n * c * (3 * c + c + 2 * config.mlp_dim)  # qkv, proj, mlp
    per_layer += 2 * 2 * n * n * c  # q.k and p.v
    if config.use_relative_position_embeddings:
        per_layer += 2 * n * c * (rows + cols)  # q.R_h and q.R_w
    passes = 2 * (config.merge_index + 1) + (config.num_hidden_layers - config.merge_index - 1)
    total = passes * per_layer + 2 * (2 * n * p * p * config.num_channels * c)  # + both patch embeddings
    height, width = config.image_size
    taps = len(config.intermediate_hidden_state_indices)
    total += 2 * n * c * taps * p * p * d + 2 * height * width * (9 * d * d + 3 * d)  # decoder
    return float(batch * total)


def make_inputs(batch: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((batch, 3, 448, 448), dtype=np.float32) for k in INPUT_NAMES}


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------------------- workers
def worker_ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import seggpt_jax

    if args.cache_dir:
        seggpt_jax.enable_compilation_cache(args.cache_dir)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    start = time.perf_counter()
    model = seggpt_jax.SegGptForImageSegmentation.from_pretrained(
        args.checkpoint, dtype=dtype, precision=None if args.dtype == "bfloat16" else "highest",
        runtime=seggpt_jax.RuntimeConfig(attention=args.attention))
    load_seconds = time.perf_counter() - start
    result = {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "load_s": load_seconds}
    for batch in args.batches:
        inputs = make_inputs(batch)
        run = lambda: model(**inputs).pred_masks.block_until_ready()  # noqa: E731
        first = timed(run, 1)[0]
        steady = timed(run, args.repeats)
        result[f"batch{batch}"] = {"first_call_s": first, "median_s": statistics.median(steady), "all_s": steady}
        if batch == args.batches[0] and args.save_output:
            np.save(args.save_output, np.asarray(model(**inputs).pred_masks))
    result["peak_memory_bytes"] = peak_memory_bytes()
    return result


def worker_torch(args) -> dict:
    import numpy as np
    import torch
    from transformers import SegGptForImageSegmentation
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = "cuda" if args.device == "gpu" else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = SegGptForImageSegmentation.from_pretrained(args.checkpoint, dtype=dtype).to(device).eval()
    if args.compile:
        model = torch.compile(model)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
    for batch in args.batches:
        inputs = {k: torch.from_numpy(v).to(device=device, dtype=dtype) for k, v in make_inputs(batch).items()}

        def run():
            with torch.no_grad():
                out = model(**inputs).pred_masks
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        first = timed(run, 1)[0]
        steady = timed(run, args.repeats)
        result[f"batch{batch}"] = {"first_call_s": first, "median_s": statistics.median(steady), "all_s": steady}
        if batch == args.batches[0] and args.save_output:
            np.save(args.save_output, run().float().cpu().numpy())
    result["peak_memory_bytes"] = peak_memory_bytes()
    return result


def matmul_rate(size: int, dtype: str = "float32", repeats: int = 3) -> float:
    """FLOP/s of XLA's best ``size``-cubed matmul of ``repeats`` in ``dtype`` (after a warm-up call)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    return 2 * size ** 3 / min(timed(lambda: f(a, a).block_until_ready(), repeats))


def worker_matmul_peak(args) -> dict:
    """The float32 (or bf16 on GPU) matmul rate XLA reaches here: the ceiling for utilisation."""
    size = 4096 if args.device == "cpu" else 8192
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    return {"size": size, "dtype": dtype, "flops_per_s": matmul_rate(size, dtype)}


WORKERS = {"ours": worker_ours, "torch": worker_torch, "matmul-peak": worker_matmul_peak}


def run_worker(name: str, base: argparse.Namespace, **overrides) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", name, "--device", base.device,
            "--checkpoint", base.checkpoint, "--repeats", str(overrides.pop("repeats", base.repeats))]
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    print(f"  running {name} {overrides}", flush=True)
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- driver
def write_checkpoint(workdir: str) -> str:
    path = os.path.join(workdir, "vit_large_random")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from transformers import SegGptConfig, SegGptForImageSegmentation

    torch.manual_seed(0)
    model = SegGptForImageSegmentation(SegGptConfig()).eval()
    with torch.no_grad():  # non-trivial LayerNorm/bias/relative-position values, as in the tests
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.3 if "rel_pos" in name else 0.02))
    model.save_pretrained(path)
    return path


def class_map_agreement(a, b) -> float:
    """Share of query pixels whose post-processed class (palette of 20 labels) agrees."""
    import numpy as np

    from seggpt_jax.imaging.processor import SegGptImageProcessor

    processor = SegGptImageProcessor()
    maps_a = processor.post_process_semantic_segmentation(a, num_labels=20)
    maps_b = processor.post_process_semantic_segmentation(b, num_labels=20)
    return float(np.mean([np.mean(x == y) for x, y in zip(maps_a, maps_b)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--workdir", default=os.path.join(HERE, ".cache"))
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--throughput-batches", type=int, nargs="+", default=None,
                        help="batch sizes for throughput (default: cpu 4, gpu 32 64)")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile (slow first call)")
    # worker-only arguments
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--attention", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save-output", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    import numpy as np

    from seggpt_jax import SegGptConfig

    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    args.checkpoint = write_checkpoint(args.workdir)
    gpu = args.device == "gpu"
    ours_dtype = "bfloat16" if gpu else "float32"
    throughput = args.throughput_batches or ([32, 64] if gpu else [4])
    scratch = tempfile.mkdtemp(prefix="seggpt-bench-")
    outputs = {name: os.path.join(scratch, f"{name}.npy") for name in ("ours", "torch", "ours_bf16", "torch_bf16")}
    config = SegGptConfig()
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}".strip(", "),
                    "python": platform.python_version(), "device": args.device,
                    "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                    "flops_per_image": forward_flops(config, 1)}
    print("measuring the matmul ceiling", flush=True)
    report["matmul_peak"] = run_worker("matmul-peak", args)

    print("latency, batch 1", flush=True)
    cache = os.path.join(scratch, "xla-cache")
    report["ours_b1"] = run_worker("ours", args, batches=[1], dtype=ours_dtype, cache_dir=cache,
                                   save_output=outputs["ours"])
    report["ours_b1_cached"] = run_worker("ours", args, batches=[1], dtype=ours_dtype, cache_dir=cache, repeats=1)
    report["torch_b1"] = run_worker("torch", args, batches=[1], save_output=outputs["torch"])
    if gpu:
        report["torch_b1_bf16"] = run_worker("torch", args, batches=[1], dtype="bfloat16")
    if args.torch_compile:
        report["torch_compile_b1"] = run_worker("torch", args, batches=[1], compile=True)

    print(f"throughput, batch {throughput}", flush=True)
    report["ours_throughput"] = run_worker("ours", args, batches=throughput, dtype=ours_dtype)
    report["torch_throughput"] = run_worker("torch", args, batches=throughput)
    if gpu:
        report["torch_throughput_bf16"] = run_worker("torch", args, batches=throughput, dtype="bfloat16")

    print("bfloat16 accuracy against our float32", flush=True)
    if gpu:  # the batch-1 run above was already bfloat16; get float32 for the reference
        run_worker("ours", args, batches=[1], dtype="float32", repeats=1, save_output=outputs["ours_bf16"])
        bf16, f32 = np.load(outputs["ours"]), np.load(outputs["ours_bf16"])
    else:
        run_worker("ours", args, batches=[1], dtype="bfloat16", repeats=1, save_output=outputs["ours_bf16"])
        bf16, f32 = np.load(outputs["ours_bf16"]), np.load(outputs["ours"])
    ours32 = f32
    theirs = np.load(outputs["torch"])
    report["parity_pred_masks_max_abs"] = float(np.abs(ours32 - theirs).max())
    report["bf16_pred_masks_mean_abs"] = float(np.abs(bf16 - f32).mean())
    report["bf16_class_map_agreement"] = class_map_agreement(bf16, f32)

    summarise(report, throughput)
    stamp = datetime.date.today().isoformat()
    with open(os.path.join(args.out, f"benchmark-{args.device}-{stamp}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, f"benchmark-{args.device}-{stamp}.md"), "w") as f:
        f.write(report["markdown"])
    print(report["markdown"])


def summarise(report: dict, throughput: list[int]) -> None:
    flops = report["flops_per_image"]
    peak = report["matmul_peak"]["flops_per_s"]
    ours, torch_ = report["ours_b1"]["batch1"], report["torch_b1"]["batch1"]
    cold = report["ours_b1"]["batch1"]["first_call_s"]
    cached = report["ours_b1_cached"]["batch1"]["first_call_s"]
    rows = [("latency, batch 1 (s)", f"{ours['median_s']:.2f}", f"{torch_['median_s']:.2f}",
             f"{torch_['median_s'] / ours['median_s']:.2f}x")]
    if "torch_b1_bf16" in report:
        t = report["torch_b1_bf16"]["batch1"]["median_s"]
        rows.append(("  vs transformers bf16 eager", "", f"{t:.2f}", f"{t / ours['median_s']:.2f}x"))
    if "torch_compile_b1" in report:
        t = report["torch_compile_b1"]["batch1"]
        rows.append(("  vs torch.compile (first call)", "", f"{t['median_s']:.2f} ({t['first_call_s']:.0f})",
                     f"{t['median_s'] / ours['median_s']:.2f}x"))
    best = max(throughput)
    ours_tp = best / report["ours_throughput"][f"batch{best}"]["median_s"]
    torch_tp = best / report["torch_throughput"][f"batch{best}"]["median_s"]
    rows.append((f"throughput, batch {best} (images/s)", f"{ours_tp:.2f}", f"{torch_tp:.2f}",
                 f"{ours_tp / torch_tp:.2f}x"))
    if "torch_throughput_bf16" in report:
        t = best / report["torch_throughput_bf16"][f"batch{best}"]["median_s"]
        rows.append(("  vs transformers bf16 eager", "", f"{t:.2f}", f"{ours_tp / t:.2f}x"))
    rows += [
        ("first call, empty compilation cache (s)", f"{cold:.2f}", f"{torch_['first_call_s']:.2f}", ""),
        ("  of which compile (first - steady)", f"{cold - ours['median_s']:.2f}", "", ""),
        ("first call, persistent cache warm (s)", f"{cached:.2f}", "", ""),
        ("  of which trace + cache load", f"{cached - ours['median_s']:.2f}", "", ""),
        ("peak host memory, batch 1 (GB)", f"{report['ours_b1']['peak_memory_bytes'] / 1e9:.2f}",
         f"{report['torch_b1']['peak_memory_bytes'] / 1e9:.2f}",
         f"{report['ours_b1']['peak_memory_bytes'] / report['torch_b1']['peak_memory_bytes']:.2f}x"),
        ("model FLOP/s, batch 1 (TFLOP/s)", f"{flops / ours['median_s'] / 1e12:.3f}",
         f"{flops / torch_['median_s'] / 1e12:.3f}", ""),
        (f"  utilisation of measured matmul peak ({peak / 1e12:.3f} TFLOP/s)",
         f"{flops / ours['median_s'] / peak:.0%}", f"{flops / torch_['median_s'] / peak:.0%}", ""),
        (f"  at batch {best}", f"{flops * ours_tp / peak:.0%}", f"{flops * torch_tp / peak:.0%}", ""),
        ("parity: pred_masks max abs error vs transformers (float32)", f"{report['parity_pred_masks_max_abs']:.2e}",
         "", ""),
        ("bfloat16 vs our float32: pred_masks mean abs error", f"{report['bf16_pred_masks_mean_abs']:.2e}", "", ""),
        ("bfloat16 vs our float32: class-map pixel agreement", f"{report['bf16_class_map_agreement']:.2%}", "", ""),
    ]
    lines = [f"Benchmark {report['date']}, {report['machine']}, device {report['device']} "
             f"({report['ours_b1']['device']}), python {report['python']}, torch {report['torch_b1']['torch']} "
             f"({report['torch_b1']['threads']} threads)",
             f"Command: `{report['command']}`; one forward = {flops / 1e12:.2f} TFLOP", "",
             "| measure | seggpt-jax | transformers | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    report["markdown"] = "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
