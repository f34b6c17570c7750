"""Peak host memory of ``from_pretrained`` on a full-size ViT-L checkpoint, in copies of the weights.

    python -m benchmarks.load_memory [--workdir DIR] [--formats safetensors bin original]

transformers writes a random-weight ViT-L checkpoint (1.2 GB of float32) once into DIR; each format is
then loaded in a fresh process, which reports its peak resident memory before and after loading.
"copies" = (peak after - peak before) / weight bytes: the loaded parameters themselves are one copy.
Needs the test extra (torch, transformers) to write the checkpoints.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap

# VmHWM is this process image's own peak (ru_maxrss would include the parent's, kept across exec).
PROBE = textwrap.dedent("""
    import sys, time, jax
    from seggpt_jax import SegGptForImageSegmentation
    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    jax.numpy.zeros(1).block_until_ready()
    before = peak()
    start = time.perf_counter()
    model = SegGptForImageSegmentation.from_pretrained(sys.argv[1])
    seconds = time.perf_counter() - start
    print(before, peak(), seconds)
""")


def write_checkpoints(workdir: str) -> dict[str, str]:
    import torch
    from transformers import SegGptConfig, SegGptForImageSegmentation

    paths = {"safetensors": os.path.join(workdir, "hf"), "bin": os.path.join(workdir, "bin"),
             "original": os.path.join(workdir, "original", "seggpt_vit_large.pth")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    torch.manual_seed(0)
    model = SegGptForImageSegmentation(SegGptConfig()).eval()
    model.save_pretrained(paths["safetensors"])
    os.makedirs(paths["bin"], exist_ok=True)
    model.config.save_pretrained(paths["bin"])
    state = model.state_dict()
    torch.save(state, os.path.join(paths["bin"], "pytorch_model.bin"))
    os.makedirs(os.path.dirname(paths["original"]), exist_ok=True)
    from seggpt_jax_testing.transformers_harness import to_original_names  # the tests' hand-written BAAI names

    torch.save({"model": to_original_names(state)}, paths["original"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), ".cache", "vit_large"))
    parser.add_argument("--formats", nargs="+", default=["safetensors", "bin", "original"])
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    paths = write_checkpoints(args.workdir)
    from flax import nnx

    from seggpt_jax import SegGptConfig, SegGptForImageSegmentation

    abstract = nnx.eval_shape(lambda: SegGptForImageSegmentation(SegGptConfig(), rngs=nnx.Rngs(0)))
    weight_bytes = sum(v.size * 4 for _, v in nnx.to_flat_state(nnx.state(abstract)))
    rows = []
    for fmt in args.formats:
        out = subprocess.run([sys.executable, "-c", PROBE, paths[fmt]], capture_output=True, text=True, check=True)
        before, after, seconds = out.stdout.split()
        extra = int(after) - int(before)
        rows.append({"format": fmt, "weights_GB": weight_bytes / 1e9, "peak_before_GB": int(before) / 1e9,
                     "peak_after_GB": int(after) / 1e9, "copies": extra / weight_bytes, "seconds": float(seconds)})
    print(f"# from_pretrained peak host memory, ViT-L ({weight_bytes / 1e9:.2f} GB of float32 weights)")
    print(f"# {datetime.date.today()} {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}")
    print("| format | load time (s) | peak RSS before (GB) | peak RSS after (GB) | extra / weights |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['seconds']:.1f} | {r['peak_before_GB']:.2f} | {r['peak_after_GB']:.2f} "
              f"| {r['copies']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
