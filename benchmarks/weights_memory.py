"""Peak host memory and time of reading and saving full-size ViT-L weights, per reader and per layout.

    python -m benchmarks.weights_memory [--workdir DIR] [--readers pread mmap git:2d2866d] [--repeat 3]

transformers writes a random-weight ViT-L checkpoint (1.48 GB of float32) once into DIR. Each case runs
in a fresh process, which resets its peak-RSS mark (``/proc/self/clear_refs``) just before the measured
step and reports the rise of the mark ("extra", in GB and in copies of the weights) and the wall time:

* ``load``: ``SegGptForImageSegmentation.from_pretrained`` (the loaded parameters are one copy);
* ``read``: ``read_safetensors`` of the whole file into numpy arrays (one copy);
* ``save-<layout>``: ``save_pretrained(layout=...)`` of the loaded model, and ``save-library`` for
  comparison: the transformers layout through ``safetensors.numpy.save_file`` of a dict of arrays.

Readers: ``pread`` (the safetensors library, our default), ``mmap`` (the library's default backend), and
``git:<commit>`` (the ``SafetensorsReader`` of ``seggpt_jax/weights/readers.py`` at that commit, read
with ``git show``). The file is read once beforehand so that every case finds it in the page cache.
Linux only; needs the test extra (torch, transformers) to write the checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import importlib.util, os, subprocess, sys, tempfile, time
    import jax, numpy as np
    reader, task, path, out, repo = sys.argv[1:6]
    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    jax.numpy.zeros(1).block_until_ready()
    from seggpt_jax import SegGptForImageSegmentation
    from seggpt_jax.weights import read_safetensors, readers
    if reader == "mmap":
        import safetensors
        library_open = safetensors.safe_open
        safetensors.safe_open = lambda file, framework, backend=None: library_open(file, framework, backend="mmap")
    elif reader.startswith("git:"):
        source = subprocess.run(["git", "-C", repo, "show", reader[4:] + ":seggpt_jax/weights/readers.py"],
                                check=True, capture_output=True).stdout
        module_path = os.path.join(tempfile.mkdtemp(), "old_readers.py")
        open(module_path, "wb").write(source)
        spec = importlib.util.spec_from_file_location("old_readers", module_path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        readers.SafetensorsReader = old.SafetensorsReader  # open_weights and read_safetensors look it up
    model = SegGptForImageSegmentation.from_pretrained(path) if task.startswith("save") else None
    reset_peak()
    before = peak()
    start = time.perf_counter()
    if task == "load":
        model = SegGptForImageSegmentation.from_pretrained(path)
    elif task == "read":
        arrays, _ = read_safetensors(os.path.join(path, "model.safetensors"))
        assert sum(a.nbytes for a in arrays.values()) > 0
    elif task == "save-library":
        from safetensors.numpy import save_file
        from seggpt_jax.weights import TRANSFORMERS, flat_parameters
        tensors = {}
        for name, var in flat_parameters(model).items():
            key, transform = TRANSFORMERS.source_for(name)
            tensors[key] = np.ascontiguousarray(transform.invert(np.asarray(var[...])))
        os.makedirs(out, exist_ok=True)
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(out, layout=task[len("save-"):])
    print(before, peak(), time.perf_counter() - start)
""")


def write_checkpoint(workdir: str) -> str:
    folder = os.path.join(workdir, "hf")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    from transformers import SegGptConfig, SegGptForImageSegmentation

    torch.manual_seed(0)
    SegGptForImageSegmentation(SegGptConfig()).eval().save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), ".cache", "vit_large"))
    parser.add_argument("--readers", nargs="+", default=["pread", "mmap"])
    parser.add_argument("--layouts", nargs="+", default=["seggpt-jax", "transformers", "original"])
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the table shows the fastest")
    args = parser.parse_args()
    folder = write_checkpoint(args.workdir)
    weights = os.path.join(folder, "model.safetensors")
    weight_bytes = os.path.getsize(weights)
    with open(weights, "rb") as f:
        while f.read(1 << 26):
            pass
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cases = [(reader, task) for reader in args.readers for task in ("load", "read")]
    cases += [("pread", f"save-{layout}") for layout in [*args.layouts, "library"]]
    print(f"# ViT-L, {weight_bytes / 1e9:.2f} GB of float32 weights; {datetime.date.today()} {platform.machine()} "
          f"{os.cpu_count()} cores, python {platform.python_version()}")
    print("| reader | step | time (s) | extra peak RSS (GB) | extra / weights |")
    print("|---|---|---|---|---|")
    for reader, task in cases:
        runs = []
        for _ in range(args.repeat):
            out = os.path.join(args.workdir, "saved", task)
            result = subprocess.run([sys.executable, "-c", PROBE, reader, task, folder, out, repo],
                                    capture_output=True, text=True, cwd=repo)
            if result.returncode:
                sys.exit(f"{reader} {task} failed:\n{result.stderr[-3000:]}")
            before, after, seconds = result.stdout.split()
            runs.append((float(seconds), int(after) - int(before)))
        seconds = min(r[0] for r in runs)
        extra = max(r[1] for r in runs)
        print(f"| {reader} | {task} | {seconds:.1f} | {extra / 1e9:.2f} | {extra / weight_bytes:.2f} |", flush=True)


if __name__ == "__main__":
    main()
