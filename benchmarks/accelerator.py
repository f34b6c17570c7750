"""Every attention implementation on a GPU or TPU, float32 and bfloat16, against transformers, in one run.

    python -m benchmarks.accelerator                   # on the GPU or TPU machine; ~30-60 minutes for ViT-L
    python -m benchmarks.accelerator --dry-run --out /tmp/acc   # CPU, tiny config: checks the script itself
    python -m benchmarks.accelerator --quick           # run this first on a new machine: about a minute

``--quick`` checks forward and gradient parity of every attention implementation against the plain
path at ``precision="highest"`` on the ViT-L attention shape (1 image, 16 heads, 56 x 28 grid), in
float32 and bfloat16, then times the ViT-L painter (random weights, ``attention="auto"``) at batch 1
and 8 in both dtypes, and ends with a one-line verdict. With ``--dry-run`` it uses a small grid and
the tiny config (CPU: the flash kernel in interpret mode), to check the script itself.

For each attention implementation (plain, chunked, flash, widened) and compute dtype (float32 at
``precision="highest"``, bfloat16 at the default precision) it measures images/s and peak device
memory at batch 1, 8 and 32; then transformers eager in float32 and bfloat16, and ``torch.compile``
where torch has a GPU. It reports the class-map agreement of our bfloat16 output with our float32
output (per implementation) and the float32 parity with transformers. transformers writes one
random-weight checkpoint (``--workdir``) that every side loads; every measurement runs in a fresh
worker process of this script, so each peak is that configuration's own and an out-of-memory error
only ends its own row. A configuration a platform cannot run (cuDNN in float32) is reported as such.

Peak memory: ``device.memory_stats()["peak_bytes_in_use"]`` (JAX) and
``torch.cuda.max_memory_allocated()`` after the batch; one JAX process runs the batches in increasing
order, so each figure is the peak up to that batch. Without device statistics (CPU) the process's
peak resident memory is reported instead, marked "host".

Writes ``accelerator-<device>-<date>.json`` and ``.md`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

from benchmarks.benchmark import class_map_agreement, forward_flops, peak_memory_bytes, timed

HERE = os.path.dirname(os.path.abspath(__file__))

IMPLEMENTATIONS = ("plain", "chunked", "flash", "widened")
DTYPES = ("float32", "bfloat16")
BATCHES = (1, 8, 32)
#: The tiny model of ``--dry-run`` (transformers' own test config, non-square canvas).
DRY_RUN_CONFIG = dict(image_size=[64, 32], patch_size=4, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                      merge_index=2, intermediate_hidden_state_indices=[2, 4, 5], pretrain_image_size=24,
                      decoder_hidden_size=8)


# ----------------------------------------------------------------------------------------- helpers
def make_inputs(query_size: tuple[int, int], batch: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((batch, 3, *query_size), dtype=np.float32)
            for name in ("pixel_values", "prompt_pixel_values", "prompt_masks")}


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def out_of_memory(error: BaseException) -> bool:
    return bool(re.search(r"RESOURCE_EXHAUSTED|out of memory|OutOfMemory", str(error), re.IGNORECASE))


# ----------------------------------------------------------------------------------------- workers
def worker_ours(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from seggpt_jax import RuntimeConfig, SegGptForImageSegmentation
    from seggpt_jax.nn.attention import resolve_impl

    dtype = jnp.dtype(spec["dtype"])
    device = jax.devices()[0]
    result = {"backend": jax.default_backend(), "device": device.device_kind, "jax": jax.__version__}
    try:
        result["resolved"] = resolve_impl(spec["attention"], dtype)
    except ValueError as e:  # e.g. cuDNN in float32
        return {**result, "skipped": str(e)}
    model = SegGptForImageSegmentation.from_pretrained(
        spec["checkpoint"], dtype=dtype, precision="highest" if dtype == jnp.float32 else None,
        runtime=RuntimeConfig(attention=spec["attention"]))
    for batch in spec["batches"]:
        inputs = make_inputs(model.config.query_size, batch)
        run = lambda: model(**inputs).pred_masks.block_until_ready()  # noqa: E731
        try:
            first = timed(run, 1)[0]
            steady = timed(run, spec["repeats"])
        except Exception as e:  # noqa: BLE001 - an accelerator's out-of-memory is an XlaRuntimeError
            result[f"batch{batch}"] = {"error": one_line(e)}
            if out_of_memory(e):
                break  # larger batches will not fit either
            continue
        stats = device.memory_stats() or {}
        peak, where = (stats["peak_bytes_in_use"], "device") if "peak_bytes_in_use" in stats else \
            (peak_memory_bytes(), "host")
        median = statistics.median(steady)
        result[f"batch{batch}"] = {"first_call_s": first, "median_s": median, "all_s": steady,
                                   "images_per_s": batch / median, "peak_bytes": peak, "peak_of": where}
        if batch == spec["batches"][0] and spec.get("save_output"):
            np.save(spec["save_output"], np.asarray(model(**inputs).pred_masks))
    return result


def worker_torch(spec: dict) -> dict:
    import numpy as np
    import torch
    from transformers import SegGptForImageSegmentation
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    if spec["require_gpu"] and not cuda:
        return {"skipped": "torch sees no CUDA GPU here"}
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, spec["dtype"])
    model = SegGptForImageSegmentation.from_pretrained(spec["checkpoint"], dtype=dtype).to(device).eval()
    if spec["compile"]:
        model = torch.compile(model)
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    size = tuple(model.config.image_size)
    for batch in spec["batches"]:
        inputs = {k: torch.from_numpy(v).to(device=device, dtype=dtype)
                  for k, v in make_inputs((size[0] // 2, size[1]), batch).items()}

        def run():
            with torch.no_grad():
                out = model(**inputs).pred_masks
            if cuda:
                torch.cuda.synchronize()
            return out

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            first = timed(run, 1)[0]
            steady = timed(run, spec["repeats"])
        except Exception as e:  # noqa: BLE001 - torch.OutOfMemoryError, or torch.compile failing here
            result[f"batch{batch}"] = {"error": one_line(e)}
            if out_of_memory(e):
                break
            continue
        peak, where = (torch.cuda.max_memory_allocated(), "device") if cuda else (peak_memory_bytes(), "host")
        median = statistics.median(steady)
        result[f"batch{batch}"] = {"first_call_s": first, "median_s": median, "all_s": steady,
                                   "images_per_s": batch / median, "peak_bytes": peak, "peak_of": where}
        if batch == spec["batches"][0] and spec.get("save_output"):
            np.save(spec["save_output"], run().float().cpu().numpy())
    return result


WORKERS = {"ours": worker_ours, "torch": worker_torch}


def run_worker(name: str, spec: dict, env: dict, timeout: float | None) -> dict:
    print(f"  {name} {', '.join(f'{k}={v}' for k, v in spec.items() if k in ('attention', 'dtype', 'compile'))}",
          flush=True)
    argv = [sys.executable, "-m", "benchmarks.accelerator", "--worker", name, "--spec", json.dumps(spec)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                             cwd=os.path.dirname(HERE))
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout:.0f}s"}
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        return {"error": f"worker exited with status {out.returncode}: {lines[-1] if lines else ''}"[:400]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- driver
def write_checkpoint(folder: str, config_kwargs: dict | None) -> tuple[str, bool]:
    """A random-weight checkpoint written by transformers (``(path, True)``), or by seggpt-jax when
    transformers is not installed (``(path, False)``: no transformers rows then)."""
    name = "tiny_random" if config_kwargs else "vit_large_random"
    path = os.path.join(folder, name)
    try:
        import torch
        from transformers import SegGptConfig, SegGptForImageSegmentation
    except ImportError:
        from flax import nnx

        from seggpt_jax import SegGptConfig as OurConfig
        from seggpt_jax import SegGptForImageSegmentation as Ours

        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            config = OurConfig.from_dict(config_kwargs) if config_kwargs else OurConfig.vit_large()
            Ours(config, rngs=nnx.Rngs(0)).save_pretrained(path)
        return path, False
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        torch.manual_seed(0)
        model = SegGptForImageSegmentation(SegGptConfig(**(config_kwargs or {}))).eval()
        with torch.no_grad():  # non-trivial LayerNorm/bias/relative-position values, as in the tests
            for key, param in model.named_parameters():
                param.add_(torch.randn_like(param) * (0.3 if "rel_pos" in key else 0.02))
        model.save_pretrained(path)
    return path, True


# ------------------------------------------------------------------------------------------ --quick
#: Parity bounds of --quick (max abs error relative to max |plain|, forward and every gradient): float32
#: at precision="highest" must hold the 1e-4 parity with transformers; bfloat16 about two roundings.
QUICK_BOUNDS = {"float32": 1e-4, "bfloat16": 2e-2}


def quick_parity(dtype_name: str, small: bool) -> dict[str, dict]:
    """Forward and gradient of each implementation against plain, on the ViT-L attention shape."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from seggpt_jax.nn.attention import attention, resolve_impl

    dtype = jnp.dtype(dtype_name)
    grid, heads, dim = ((8, 4), 2, 16) if small else ((56, 28), 16, 64)
    keys = jax.random.split(jax.random.key(0), 6)
    shape = (1, grid[0] * grid[1], heads, dim)
    q, k, v = (jax.random.normal(keys[i], shape).astype(dtype) for i in range(3))
    tables = tuple(0.5 * jax.random.normal(key, (2 * n - 1, dim)).astype(dtype) for key, n in zip(keys[3:5], grid))
    cotangent = jax.random.normal(keys[5], shape).astype(dtype)

    def run(impl):
        def f(q, k, v, tables):
            out = attention(q, k, v, impl=impl, scale=dim ** -0.5, grid=grid, rel_pos=tables, precision="highest")
            return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out
        (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, tables)
        return [out, *jax.tree.leaves(grads)]

    def error(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    reference = run("plain")
    results = {}
    for impl in ("chunked", "flash", "widened"):
        try:
            resolve_impl(impl, dtype)
            ours = run(impl)
        except Exception as e:  # noqa: BLE001 - e.g. cuDNN in float32, or no cuDNN for this head dim
            results[impl] = {"skipped": one_line(e)}
            continue
        errors = [error(a, b) for a, b in zip(ours, reference, strict=True)]
        results[impl] = {"forward": errors[0], "gradients": max(errors[1:]),
                         "ok": max(errors) <= QUICK_BOUNDS[dtype_name]}
    return results


def quick_speed(dtype_name: str, batches: list[int], small: bool) -> dict[str, dict]:
    import jax.numpy as jnp
    from flax import nnx

    from seggpt_jax import SegGptConfig, SegGptForImageSegmentation

    config = SegGptConfig.from_dict(DRY_RUN_CONFIG) if small else SegGptConfig.vit_large()
    model = SegGptForImageSegmentation(config, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(0))
    results = {}
    for batch in batches:
        inputs = make_inputs(config.query_size, batch)
        run = lambda: model(**inputs).pred_masks.block_until_ready()  # noqa: E731
        try:
            first = timed(run, 1)[0]
            median = statistics.median(timed(run, 3))
        except Exception as e:  # noqa: BLE001 - out of memory on a small device
            results[f"batch{batch}"] = {"error": one_line(e)}
            continue
        results[f"batch{batch}"] = {"images_per_s": batch / median, "median_s": median, "first_call_s": first}
    return results


def quick(dry_run: bool) -> int:
    import jax

    device = jax.devices()[0]
    print(f"device: {device.device_kind} (JAX backend {jax.default_backend()}, jax {jax.__version__})"
          + (" -- DRY RUN: small shapes, not a measurement" if dry_run else ""), flush=True)
    failures = []
    for dtype in DTYPES:
        for impl, r in quick_parity(dtype, dry_run).items():
            if "skipped" in r:
                print(f"  parity {impl:8s} {dtype:9s} skipped: {r['skipped']}")
                continue
            print(f"  parity {impl:8s} {dtype:9s} forward {r['forward']:.1e}  gradients {r['gradients']:.1e}  "
                  f"{'ok' if r['ok'] else 'OVER ' + format(QUICK_BOUNDS[dtype], '.0e')}", flush=True)
            if not r["ok"]:
                failures.append(f"{impl} {dtype}")
    speeds = {}
    for dtype in DTYPES:
        for batch, r in quick_speed(dtype, [1, 8], dry_run).items():
            if "error" in r:
                print(f"  speed  {dtype:9s} {batch}: {r['error']}")
                failures.append(f"speed {dtype} {batch}")
                continue
            speeds[(dtype, batch)] = r["images_per_s"]
            print(f"  speed  {dtype:9s} {batch}: {r['images_per_s']:.2f} img/s (first call {r['first_call_s']:.1f} s)",
                  flush=True)
    best = max(speeds.items(), key=lambda item: item[1], default=None)
    fastest = f"; fastest {best[1]:.2f} img/s ({best[0][0]}, {best[0][1]})" if best else ""
    if failures:
        print(f"VERDICT: FAIL on {device.device_kind}: {', '.join(failures)}{fastest}")
        return 1
    print(f"VERDICT: OK on {device.device_kind}: every implementation within parity bounds{fastest}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the .json and .md results")
    parser.add_argument("--workdir", default=os.path.join(HERE, ".cache"), help="where the random checkpoint goes")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per batch after the first")
    parser.add_argument("--attention", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile (slow first calls)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny config on CPU, batches 1 and 2, one repeat: checks the script, measures nothing")
    parser.add_argument("--quick", action="store_true",
                        help="parity of every attention implementation, then img/s at batch 1 and 8, and a verdict")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.spec))))
        return
    if args.quick:
        sys.exit(quick(args.dry_run))

    env = dict(os.environ)
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
        args.batches, args.repeats, args.no_torch_compile = [1, 2], 1, True
    timeout = 600 if args.dry_run else None
    args.out, args.workdir = os.path.abspath(args.out), os.path.abspath(args.workdir)  # workers run elsewhere
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    checkpoint, have_transformers = write_checkpoint(args.workdir, DRY_RUN_CONFIG if args.dry_run else None)
    scratch = tempfile.mkdtemp(prefix="seggpt-accelerator-")
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
                    "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "batches": args.batches,
                    "ours": {}, "transformers": {}}
    base = {"checkpoint": checkpoint, "batches": args.batches, "repeats": args.repeats}
    outputs: dict[str, str] = {}
    print("seggpt-jax", flush=True)
    for dtype in DTYPES:
        for impl in args.attention:
            key = f"{impl} {dtype}"
            outputs[key] = os.path.join(scratch, f"ours-{impl}-{dtype}.npy")
            report["ours"][key] = run_worker("ours", {**base, "attention": impl, "dtype": dtype,
                                                      "save_output": outputs[key]}, env, timeout)
    first = next((r for r in report["ours"].values() if "device" in r), {"device": "unknown", "backend": "unknown"})
    report["device"], report["backend"] = first["device"], first["backend"]
    gpu = report["backend"] == "gpu"
    if have_transformers and not (gpu or args.dry_run):
        report["transformers"]["eager float32"] = {
            "skipped": f"transformers is measured on CUDA GPUs; on {report['backend']} it would need torch_xla"}
    elif have_transformers:
        print("transformers", flush=True)
        for compiled in (False, True):
            if compiled and args.no_torch_compile:
                continue
            for dtype in DTYPES:
                key = f"{'torch.compile' if compiled else 'eager'} {dtype}"
                outputs[key] = os.path.join(scratch, f"torch-{compiled}-{dtype}.npy")
                report["transformers"][key] = run_worker(
                    "torch", {**base, "dtype": dtype, "compile": compiled, "require_gpu": gpu and not args.dry_run,
                              "save_output": outputs[key]}, env, timeout)
    agreement(report, outputs)
    summarise(report)
    slug = "dryrun-cpu" if args.dry_run else re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    stem = os.path.join(args.out, f"accelerator-{slug}-{datetime.date.today().isoformat()}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(report["markdown"])
    print(report["markdown"])
    print(f"wrote {stem}.json and .md")


def agreement(report: dict, outputs: dict[str, str]) -> None:
    """bfloat16 vs float32 class maps per implementation; float32 pred_masks against transformers'."""
    import numpy as np

    def saved(key: str):
        return np.load(outputs[key]) if key in outputs and os.path.isfile(outputs[key]) else None

    reference = saved("eager float32")
    rows = {}
    for impl in IMPLEMENTATIONS:
        f32, bf16 = saved(f"{impl} float32"), saved(f"{impl} bfloat16")
        row = {}
        if f32 is not None and bf16 is not None:
            row["bf16_class_map_agreement"] = class_map_agreement(bf16, f32)
            row["bf16_pred_masks_mean_abs"] = float(np.abs(bf16 - f32).mean())
        if f32 is not None and reference is not None:
            row["f32_max_abs_vs_transformers"] = float(np.abs(f32 - reference).max())
        if row:
            rows[impl] = row
    report["agreement"] = rows


def summarise(report: dict) -> None:
    flops = forward_flops(_config(report), 1)
    dry = " (DRY RUN: tiny config on CPU, not a measurement)" if report["dry_run"] else ""
    lines = [f"Accelerator benchmark {report['date']}{dry}",
             f"Device {report['device']} (JAX backend {report['backend']}), {report['machine']}, python "
             f"{report['python']}; command `{report['command']}`; one forward = {flops / 1e12:.3f} TFLOP", "",
             "| model | attention | dtype | batch | images/s | peak memory (GB) | first call (s) |",
             "|---|---|---|---|---|---|---|"]

    def rows(side: str, name: str, entries: dict) -> None:
        for key, result in entries.items():
            kind, dtype = key.rsplit(" ", 1)
            label = f"{kind} (auto: {result['resolved']})" if result.get("resolved") not in (None, kind) else kind
            if "skipped" in result or "error" in result:
                lines.append(f"| {name} | {label} | {dtype} | all | {result.get('skipped') or result['error']} | | |")
                continue
            for batch in report["batches"]:
                cell = result.get(f"batch{batch}")
                if cell is None:
                    lines.append(f"| {name} | {label} | {dtype} | {batch} | not run (a smaller batch ran out of "
                                 f"memory) | | |")
                elif "error" in cell:
                    lines.append(f"| {name} | {label} | {dtype} | {batch} | {cell['error']} | | |")
                else:
                    where = "" if cell["peak_of"] == "device" else " (host)"
                    lines.append(f"| {name} | {label} | {dtype} | {batch} | {cell['images_per_s']:.2f} | "
                                 f"{cell['peak_bytes'] / 1e9:.2f}{where} | {cell['first_call_s']:.1f} |")

    rows("ours", "seggpt-jax", report["ours"])
    rows("torch", "transformers", report["transformers"])
    if report["agreement"]:
        lines += ["", "| attention | bf16 vs f32 class maps | bf16 vs f32 mean abs | f32 max abs vs transformers f32 |",
                  "|---|---|---|---|"]
        for impl, row in report["agreement"].items():
            cells = [f"{row['bf16_class_map_agreement']:.2%}" if "bf16_class_map_agreement" in row else "",
                     f"{row['bf16_pred_masks_mean_abs']:.2e}" if "bf16_pred_masks_mean_abs" in row else "",
                     f"{row['f32_max_abs_vs_transformers']:.2e}" if "f32_max_abs_vs_transformers" in row else ""]
            lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    report["markdown"] = "\n".join(lines) + "\n"


def _config(report: dict):
    from seggpt_jax import SegGptConfig

    return SegGptConfig.from_dict(DRY_RUN_CONFIG) if report["dry_run"] else SegGptConfig.vit_large()


if __name__ == "__main__":
    main()
