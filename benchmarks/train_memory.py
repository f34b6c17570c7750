"""Fine-tuning memory and speed: ViT-L training steps, ours against transformers, and the memory estimate.

    python -m benchmarks.train_memory                                  # everything below (hours on 2 cores)
    python -m benchmarks.train_memory --runners trainer --batch 1 --remat none full   # a subset
    python -m benchmarks.train_memory --only-compiled                  # compile-only figures, nothing trained

Runners, each measurement in a fresh child process, one at a time:

* ``trainer``: :class:`seggpt_jax.train.Trainer` (AdamW, drop-path, donated state), ``remat_policy`` set
  through ``TrainConfig``;
* ``nnx``: the plain loop a researcher writes, ``nnx.Optimizer`` + ``nnx.jit`` (no donation), on a model
  built with ``RuntimeConfig(remat_policy=...)``;
* ``nnx-donated``: the same loop with ``@nnx.jit(donate_argnums=(0, 1))``;
* ``transformers``: eager ``loss.backward()`` + ``torch.optim.AdamW``; ``full`` is
  ``gradient_checkpointing_enable()`` (transformers has no ``dots``).

ViT-L, random weights, float32, batch sizes 1, 2, 4, remat none/dots/full. A step's time is the median
of the steps after the first (the first compiles); peak memory is the child's peak RSS (``ru_maxrss``). A
watchdog kills a child whose RSS passes ``--limit-gb`` (recorded as not fitting), and a configuration
whose compiled estimate (:func:`seggpt_jax.train.estimate_memory`) is above the limit is not started.

Compile-only figures (no training, ~1.5 GB each): the temporaries of ``jax.value_and_grad`` of the loss
at batch 1 per remat policy, and :func:`estimate_memory` over batch sizes, from which the largest batch
that fits in 24/40/80 GB is read off. Results: ``benchmarks/results/train-memory-cpu-DATE.{json,md}``
(``--name`` to choose another stem).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

GB = 1e9
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
POLICIES = ("none", "dots", "full")
BUDGETS_GB = (24, 40, 80)


def _policy(name: str) -> str | None:
    return None if name == "none" else name


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _inputs(batch: int, seed: int = 0):
    """NCHW float32 pixels, prompt, masks, labels and ``[batch, 1568]`` patch flags (75% masked per row)."""
    import numpy as np

    from seggpt_jax import SegGptConfig

    config = SegGptConfig.vit_large()
    rng = np.random.default_rng(seed)
    shape = (batch, 3, *config.query_size)
    px, pp, pm, lab = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    mask = np.zeros((batch, config.num_patches), bool)
    for row in mask:
        row[rng.permutation(config.num_patches)[: int(0.75 * config.num_patches)]] = True
    return config, px, pp, pm, lab, mask


def _run_steps(step, steps: int) -> dict:
    times, losses = [], []
    for i in range(steps):
        start = time.perf_counter()
        losses.append(float(step(i)))
        times.append(time.perf_counter() - start)
    return {"first_step_s": round(times[0], 2), "step_s": round(statistics.median(times[1:]), 2),
            "step_times_s": [round(t, 2) for t in times], "loss": losses[-1]}


def child_trainer(batch: int, remat: str, steps: int) -> dict:
    import numpy as np
    from flax import nnx

    from seggpt_jax import SegGptForImageSegmentation
    from seggpt_jax.train import Trainer, TrainConfig

    config, px, pp, pm, lab, mask = _inputs(batch)
    model = SegGptForImageSegmentation(config, rngs=nnx.Rngs(0))
    trainer = Trainer(model, TrainConfig(batch_size=batch, warmup_steps=0, remat_policy=_policy(remat)))
    data = dict(pixel_values=px, prompt_pixel_values=pp, prompt_masks=pm, labels=lab, bool_masked_pos=mask,
                is_instance=np.ones(batch, bool), valid=np.ones((batch, 1, 2 * px.shape[2], px.shape[3]), np.float32))
    return _run_steps(lambda i: trainer.train_step(data), steps)


def child_nnx(batch: int, remat: str, steps: int, donate: bool = False) -> dict:
    import jax
    import optax
    from flax import nnx

    from seggpt_jax import RuntimeConfig, SegGptForImageSegmentation

    config, px, pp, pm, lab, mask = _inputs(batch)
    model = SegGptForImageSegmentation(config, runtime=RuntimeConfig(remat_policy=_policy(remat)), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.05), wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1) if donate else ())
    def step(model, opt, key):  # the loop of the issue, as written (nnx-donated: with the state donated)
        loss, grads = nnx.value_and_grad(
            lambda m: m(px, pp, pm, labels=lab, bool_masked_pos=mask, dropout_rng=key).loss)(model)
        opt.update(model, grads)
        return loss

    return _run_steps(lambda i: step(model, opt, jax.random.key(i)), steps)


def child_transformers(batch: int, remat: str, steps: int) -> dict:
    import torch
    from transformers import SegGptConfig as HFConfig
    from transformers import SegGptForImageSegmentation as HFModel

    _, px, pp, pm, lab, mask = _inputs(batch)
    torch.manual_seed(0)
    model = HFModel(HFConfig())
    model.train()
    if remat == "full":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    inputs = {k: torch.from_numpy(v) for k, v in dict(pixel_values=px, prompt_pixel_values=pp, prompt_masks=pm,
                                                       labels=lab, bool_masked_pos=mask).items()}

    def step(_: int) -> float:
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return _run_steps(step, steps)


CHILDREN = {"trainer": child_trainer, "nnx": child_nnx,
            "nnx-donated": lambda batch, remat, steps: child_nnx(batch, remat, steps, donate=True),
            "transformers": child_transformers}


def run_child(runner: str, batch: int, remat: str, steps: int, limit_gb: float) -> dict:
    """One measurement in a fresh process; the RSS watchdog kills it above ``limit_gb``."""
    spec = json.dumps({"runner": runner, "batch": batch, "remat": remat, "steps": steps})
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.train_memory", "--child", spec],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    watched, killed = 0, False
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status", encoding="ascii") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
            watched = max(watched, rss)
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        if watched > limit_gb * GB:
            proc.kill()
            killed = True
        time.sleep(0.1)
    out = proc.stdout.read()
    record = {"runner": runner, "batch": batch, "remat": remat}
    if killed:
        return {**record, "fits": False, "peak_gb": None, "note": f"killed above {limit_gb} GB"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**record, "fits": False, "peak_gb": None, "note": f"exit code {proc.returncode}"}
    result = json.loads(lines[-1])
    return {**record, "fits": True, **result}


def child_main(spec: str) -> None:
    args = json.loads(spec)
    result = CHILDREN[args["runner"]](args["batch"], args["remat"], args["steps"])
    result["peak_gb"] = round(_peak_rss_bytes() / GB, 2)
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------ compile-only
def grad_temporaries(remat: str) -> dict:
    """XLA's temporaries of ``jax.value_and_grad`` of the ViT-L loss, batch 1 (compiled, not run)."""
    import jax
    import numpy as np
    from flax import nnx

    from seggpt_jax import RuntimeConfig, SegGptConfig, SegGptForImageSegmentation
    from seggpt_jax.nn.inputs import prepare

    config = SegGptConfig.vit_large()
    model = nnx.eval_shape(lambda: SegGptForImageSegmentation(
        config, runtime=RuntimeConfig(remat_policy=_policy(remat)), rngs=nnx.Rngs(0)))
    zeros = np.zeros((1, 3, *config.query_size), np.float32)
    inputs, options = prepare(config, zeros, zeros, zeros, np.ones((1, config.num_patches), bool), labels=zeros)
    graphdef, state = nnx.split(model)
    loss = lambda s, i: nnx.merge(graphdef, s).forward_prepared(i, options).loss  # noqa: E731
    start = time.perf_counter()
    analysis = jax.jit(jax.value_and_grad(loss)).lower(state, inputs).compile().memory_analysis()
    return {"remat": remat, "temp_gb": round(analysis.temp_size_in_bytes / GB, 2),
            "temp_gib": round(analysis.temp_size_in_bytes / 2 ** 30, 2), "compile_s": round(time.perf_counter() - start, 1)}


def estimates(batches: list[int], policies: list[str]) -> list[dict]:
    from seggpt_jax import SegGptConfig
    from seggpt_jax.train import estimate_memory

    rows = []
    for remat in policies:
        for batch in batches:
            e = estimate_memory(SegGptConfig.vit_large(), batch, remat_policy=_policy(remat))
            rows.append({"remat": remat, "batch": batch, "state_gb": round(e.state_bytes / GB, 2),
                         "temp_gb": round(e.temp_bytes / GB, 2), "total_gb": round(e.total_bytes / GB, 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def largest_batches(rows: list[dict]) -> dict[str, dict[int, int]]:
    """Per policy, the largest batch whose estimate fits each budget: a least-squares line through the
    estimates (they grow linearly with the batch), floored."""
    out = {}
    for remat in sorted({r["remat"] for r in rows}, key=POLICIES.index):
        points = [(r["batch"], r["total_gb"]) for r in rows if r["remat"] == remat]
        n = len(points)
        if n < 2:
            continue  # a line needs two batch sizes
        mean_b, mean_t = sum(b for b, _ in points) / n, sum(t for _, t in points) / n
        slope = sum((b - mean_b) * (t - mean_t) for b, t in points) / sum((b - mean_b) ** 2 for b, _ in points)
        base = mean_t - slope * mean_b
        out[remat] = {budget: max(int((budget - base) // slope), 0) for budget in BUDGETS_GB}
    return out


# ------------------------------------------------------------------------------------ report
def markdown(report: dict) -> str:
    lines = [f"# Training memory and speed, {report['date']}", "", f"`{report['command']}`", "",
             f"{report['machine']}; jax {report['versions']['jax']}, torch {report['versions']['torch']}, "
             f"transformers {report['versions']['transformers']}. ViT-L, random weights, float32, AdamW. "
             "GB = 10^9 bytes.", ""]
    if report["runs"]:
        lines += ["| runner | batch | remat | step (s) | first step (s) | peak RSS (GB) | estimate (GB) |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["runs"]:
            step = r.get("step_s", "-") if r["fits"] else r.get("note", "")
            lines.append(f"| {r['runner']} | {r['batch']} | {r['remat']} | {step} | {r.get('first_step_s', '-')} | "
                         f"{r['peak_gb'] if r['peak_gb'] is not None else '-'} | {r.get('estimate_gb') or '-'} |")
        lines.append("")
    if report["grad_temporaries"]:
        lines += ["Compiled (not run) `jax.value_and_grad` of the loss, batch 1: XLA temporaries", "",
                  "| remat | temp (GB) | temp (GiB) | compile (s) |", "|---|---|---|---|"]
        lines += [f"| {g['remat']} | {g['temp_gb']} | {g['temp_gib']} | {g['compile_s']} |"
                  for g in report["grad_temporaries"]]
        lines.append("")
    if report["estimates"]:
        lines += ["`estimate_memory` of the Trainer's step (GB)", "", "| remat | batch | state | temporaries | total |",
                  "|---|---|---|---|---|"]
        lines += [f"| {e['remat']} | {e['batch']} | {e['state_gb']} | {e['temp_gb']} | {e['total_gb']} |"
                  for e in report["estimates"]]
    if report["largest_batch"]:
        lines += ["", "Largest batch that fits (from the estimates)", "",
                  "| remat | " + " | ".join(f"{b} GB" for b in BUDGETS_GB) + " |", "|---|" + "---|" * len(BUDGETS_GB)]
        lines += [f"| {remat} | " + " | ".join(str(fit[b]) for b in BUDGETS_GB) + " |"
                  for remat, fit in report["largest_batch"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runners", nargs="+", default=list(CHILDREN), choices=list(CHILDREN))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--remat", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--steps", type=int, default=3, help="steps per run; the first compiles and is not timed")
    parser.add_argument("--limit-gb", type=float, default=20.0, help="kill a run whose RSS passes this")
    parser.add_argument("--estimate-batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--only-compiled", action="store_true", help="compile-only figures, no training run")
    parser.add_argument("--runs-only", action="store_true",
                        help="skip the batch-1 gradient temporaries; estimate only the batches that are run")
    parser.add_argument("--name", help="results file stem (default: train-memory-cpu-DATE)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return

    import jax
    import torch
    import transformers

    report = {"date": datetime.date.today().isoformat(), "command": "python -m benchmarks.train_memory "
              + " ".join(sys.argv[1:]), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.1f} GB",
              "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
              "runs": [], "grad_temporaries": [], "estimates": [], "largest_batch": {}}
    if not args.runs_only:
        report["grad_temporaries"] = [grad_temporaries(remat) for remat in args.remat]
    batches = set(args.batch) if args.runs_only else set(args.estimate_batches) | set(args.batch)
    report["estimates"] = estimates(sorted(batches), args.remat)
    report["largest_batch"] = largest_batches(report["estimates"])
    estimate_of = {(e["remat"], e["batch"]): e["total_gb"] for e in report["estimates"]}
    if not args.only_compiled:
        for batch in args.batch:
            for remat in args.remat:
                for runner in args.runners:
                    if runner == "transformers" and remat == "dots":
                        continue
                    ours = estimate_of[(remat, batch)] if runner == "trainer" else None
                    if ours is not None and ours > args.limit_gb:
                        run = {"runner": runner, "batch": batch, "remat": remat, "fits": False, "peak_gb": None,
                               "note": f"estimate {ours} GB > {args.limit_gb} GB, not started"}
                    else:
                        run = run_child(runner, batch, remat, args.steps, args.limit_gb)
                    run["estimate_gb"] = ours
                    report["runs"].append(run)
                    print(json.dumps(run), flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, args.name or f"train-memory-cpu-{report['date']}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
