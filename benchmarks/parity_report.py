"""Measured parity against transformers, per stage and for gradients, on the test configs.

    python -m benchmarks.parity_report               # tiny configs (seconds)
    python -m benchmarks.parity_report --vit-large   # also the full ViT-L with random weights (minutes)

transformers builds each model with random weights (the same perturbed init the tests use) and saves
it; seggpt-jax loads it with from_pretrained; both run the same random inputs. Prints a markdown table
of max abs errors: per stage (embeddings, worst layer, taps, pred_masks, loss) in three cases, and the
loss and worst parameter gradient of a training-style call.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np


def gradient_errors(hf, model, seed: int = 0) -> tuple[float, float]:
    import torch
    from flax import nnx

    from seggpt_jax.weights import TRANSFORMERS

    config = model.config
    rng = np.random.default_rng(seed)
    shape = (2, 3, *config.query_size)
    inputs = {k: rng.standard_normal(shape, dtype=np.float32)
              for k in ("pixel_values", "prompt_pixel_values", "prompt_masks", "labels")}
    flags = np.zeros((2, config.num_patches), bool)
    for row in flags:
        row[rng.permutation(config.num_patches)[: int(0.75 * config.num_patches)]] = True
    hf.zero_grad(set_to_none=True)
    reference = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()}, bool_masked_pos=torch.from_numpy(flags))
    reference.loss.backward()
    loss, grads = nnx.value_and_grad(lambda m: m(**inputs, bool_masked_pos=flags).loss)(model)
    ours = {".".join(str(p) for p in path): np.asarray(g[...]) for path, g in nnx.to_flat_state(grads)}
    worst = 0.0
    for name, param in hf.named_parameters():
        target, transform = TRANSFORMERS.match(name)
        theirs = param.grad.numpy() if param.grad is not None else np.zeros(param.shape, np.float32)
        worst = max(worst, float(np.max(np.abs(transform.invert(ours[target]) - theirs))))
    return abs(float(loss) - float(reference.loss.detach())), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit-large", action="store_true", help="also the full-size ViT-L (several minutes)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # a forked child must not inherit unflushed rows
    from seggpt_jax_testing.transformers_harness import TINY_CONFIGS, make_hf_model
    from transformers import SegGptConfig as HFConfig

    from seggpt_jax import SegGptForImageSegmentation
    from seggpt_jax.cli import parity

    configs = dict(TINY_CONFIGS)
    if args.vit_large:
        configs["vit_large (default)"] = {}
    print("| config | case | embeddings | worst layer | worst tap | pred_masks | loss |")
    print("|---|---|---|---|---|---|---|")
    gradient_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in configs.items():
            hf = make_hf_model(HFConfig(**kwargs))
            folder = os.path.join(tmp, name.split()[0])
            hf.save_pretrained(folder)
            model = SegGptForImageSegmentation.from_pretrained(folder)
            rows = parity.compare(model, hf, batch=2)
            by_case: dict[str, dict[str, float]] = {}
            for row in rows:
                by_case.setdefault(row.case, {})[row.stage.split(" ")[0]] = row.max_abs_error
            for case, stages in by_case.items():
                print(f"| {name} | {case} | {stages['embeddings']:.1e} | {stages['layers']:.1e} | "
                      f"{stages['taps']:.1e} | {stages['pred_masks']:.1e} | "
                      f"{stages['loss']:.1e} |" if "loss" in stages else
                      f"| {name} | {case} | {stages['embeddings']:.1e} | {stages['layers']:.1e} | "
                      f"{stages['taps']:.1e} | {stages['pred_masks']:.1e} | - |")
            if "vit_large" not in name:
                gradient_rows.append((name, *gradient_errors(hf, model)))
    print()
    print("| config | training loss error | worst parameter-gradient error |")
    print("|---|---|---|")
    for name, loss_error, grad_error in gradient_rows:
        print(f"| {name} | {loss_error:.1e} | {grad_error:.1e} |")


if __name__ == "__main__":
    main()
