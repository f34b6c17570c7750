"""What ``seggpt-jax segment`` costs on six photos, in batch-1 forwards, load and compile included.

    python -m benchmarks.segment_cli [--model DIR] [--runs 2]

Each measurement runs in a fresh process, one after another:

1. the forward: load the model, compile with one call, then time ``--forwards`` batch-1 forwards of the
   model's jitted call (median);
2. the command: ``seggpt-jax segment`` on six photos of mixed sizes (the examples/ folder's photos and
   two variants), timed from process start to exit, everything included.

The figure is (2) / (1). Without ``--model`` a ViT-L with random weights written by transformers is
created once in benchmarks/.cache. Results are appended to benchmarks/results/segment-cli-DATE.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, "benchmarks", ".cache")
EXAMPLES = os.path.join(REPO, "examples")

_FORWARD = """
import sys, time, statistics, numpy as np
from seggpt_jax import SegGptForImageSegmentation
model = SegGptForImageSegmentation.from_pretrained(sys.argv[1])
shape = (1, 3, *model.config.query_size)
rng = np.random.default_rng(0)
x, p, m = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
model(x, p, m).pred_masks.block_until_ready()
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    model(x, p, m).pred_masks.block_until_ready()
    times.append(time.perf_counter() - start)
print("FORWARD_SECONDS", statistics.median(times))
"""


def vit_large_checkpoint() -> str:
    folder = os.path.join(CACHE, "vit-large-random")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        from transformers import SegGptConfig, SegGptForImageSegmentation

        os.makedirs(CACHE, exist_ok=True)
        SegGptForImageSegmentation(SegGptConfig()).save_pretrained(folder)
    return folder


def six_photos(folder: str) -> str:
    """The example photos plus two resized variants: six photos of mixed sizes."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    queries = os.path.join(EXAMPLES, "queries")
    names = sorted(os.listdir(queries))
    for name in names:
        shutil.copy(os.path.join(queries, name), folder)
    for index, (name, scale) in enumerate(((names[0], 1.5), (names[1], 0.6))):
        with Image.open(os.path.join(queries, name)) as image:
            image.convert("RGB").resize((int(image.width * scale), int(image.height * scale))).save(
                os.path.join(folder, f"variant{index}.jpg"), quality=90)
    assert len(os.listdir(folder)) == 6
    return folder


def forward_seconds(model: str, forwards: int) -> float:
    result = subprocess.run([sys.executable, "-c", _FORWARD, model, str(forwards)], capture_output=True, text=True,
                            check=True)
    return float(next(line for line in result.stdout.splitlines() if line.startswith("FORWARD_SECONDS")).split()[1])


def command_seconds(model: str, photos: str, out_dir: str) -> float:
    command = [os.path.join(os.path.dirname(sys.executable), "seggpt-jax"), "segment", photos, "--prompt-image",
               os.path.join(EXAMPLES, "prompt.jpg"), "--prompt-mask", os.path.join(EXAMPLES, "prompt_mask.png"),
               "--out-dir", out_dir, "--model", model, "--overwrite"]
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: ViT-L with random weights, created once)")
    parser.add_argument("--runs", type=int, default=2, help="measurements of each kind (the median is kept)")
    parser.add_argument("--forwards", type=int, default=3, help="timed forwards per forward measurement")
    args = parser.parse_args()
    model = args.model or vit_large_checkpoint()
    with tempfile.TemporaryDirectory() as workdir:
        photos = six_photos(os.path.join(workdir, "photos"))
        forwards, commands = [], []
        for _ in range(args.runs):
            forwards.append(forward_seconds(model, args.forwards))
            commands.append(command_seconds(model, photos, os.path.join(workdir, "out")))
    forward, command = statistics.median(forwards), statistics.median(commands)
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "model": model, "forward_seconds": forwards, "command_seconds": commands,
              "command_in_forwards": command / forward}
    print(json.dumps(result, indent=2))
    out = os.path.join(REPO, "benchmarks", "results", f"segment-cli-{result['date']}.json")
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
