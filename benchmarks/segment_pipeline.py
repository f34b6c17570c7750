"""``seggpt-jax segment``'s decode / forward / encode pipeline against its own host work alone.

    python -m benchmarks.segment_pipeline [--images 96] [--size 640x480] [--repeats 2]

Two runs of the same command over the same folder of JPEGs, each into a fresh --out-dir:

* ``decode-and-write only``: the forward replaced by a constant answer (``Segmenter.paint_rows``
  patched), so the run is its host work alone: read and decode each JPEG, preprocess it, turn the
  answer into the mask, encode and write the mask and overlay PNGs through the output record;
* ``pipeline``: the command as it is, with a tiny random-weight model (faster than decoding, so the
  device should never be what the command waits for).

The rate is the command's own summary (images/s over the segmenting phase: model loading and the first
compile are before it). The bar (issue 20): the pipeline reaches >= 80% of the decode-and-write-only
rate on the same cores. Writes benchmarks/results/segment-pipeline-DATE.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import sys
import tempfile

import numpy as np


def _photos(folder: str, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """JPEGs with photo-like content (smooth gradients, shapes and some noise): decoding cost as for photos."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        base = np.stack([(xx / width) * 255, (yy / height) * 255, np.full_like(xx, 40 * (i % 6))], -1)
        base += rng.normal(0, 12, base.shape)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, width - 60), rng.integers(0, height - 60)
            draw.ellipse((x, y, x + rng.integers(20, 200), y + rng.integers(20, 200)),
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(os.path.join(folder, f"photo{i:04d}.jpg"), quality=90)


def _tiny_model(folder: str) -> str:
    from flax import nnx

    from seggpt_jax import SegGptConfig, SegGptForImageSegmentation

    config = SegGptConfig(image_size=(64, 32), patch_size=4, hidden_size=32, num_hidden_layers=4,
                          num_attention_heads=4, merge_index=1, intermediate_hidden_state_indices=(1, 3),
                          pretrain_image_size=24, decoder_hidden_size=8)
    path = os.path.join(folder, "tiny")
    SegGptForImageSegmentation(config, rngs=nnx.Rngs(0)).save_pretrained(path)
    return path


def _run(args: list[str]) -> float:
    from seggpt_jax.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    if code != 0:
        raise SystemExit(f"segment failed ({code}): {err.getvalue()[-2000:]}")
    match = re.search(r"; ([0-9.]+) images/s", out.getvalue())
    if not match:
        raise SystemExit(f"no rate in the summary: {out.getvalue()}")
    return float(match.group(1))


@contextlib.contextmanager
def _no_forward():
    """The forward replaced by a constant answer (mid-grey, the same shape as the model's)."""
    from seggpt_jax.inference.segmenter import Segmenter

    real = Segmenter.paint_rows

    def constant(self, pixels, *args, **kwargs):
        return np.full(np.shape(pixels), 127.0, np.float32)

    Segmenter.paint_rows = constant
    try:
        yield
    finally:
        Segmenter.paint_rows = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind; the best counts")
    parser.add_argument("--output", default=None, help="JSON file (default benchmarks/results/segment-pipeline-DATE.json)")
    options = parser.parse_args()
    size = tuple(int(v) for v in options.size.split("x"))
    with tempfile.TemporaryDirectory() as root:
        photos = os.path.join(root, "photos")
        os.makedirs(photos)
        _photos(photos, options.images, size)
        model = _tiny_model(root)
        prompt, mask = os.path.join(photos, "photo0000.jpg"), os.path.join(root, "mask.png")
        from PIL import Image

        grid = np.zeros((size[1], size[0]), np.uint8)
        grid[size[1] // 4:size[1] // 2, size[0] // 4:size[0] // 2] = 255
        Image.fromarray(grid).save(mask)
        rates: dict[str, list[float]] = {"decode-and-write only": [], "pipeline": []}
        for repeat in range(options.repeats):
            for kind in rates:
                out = os.path.join(root, f"out-{kind.split()[0]}-{repeat}")
                command = ["segment", photos, "--prompt-image", prompt, "--prompt-mask", mask, "--out-dir", out,
                           "--model", model]
                with _no_forward() if kind.startswith("decode") else contextlib.nullcontext():
                    rates[kind].append(_run(command))
                print(f"{kind}: {rates[kind][-1]:.2f} images/s", file=sys.stderr)
    best = {kind: max(values) for kind, values in rates.items()}
    ratio = best["pipeline"] / best["decode-and-write only"]
    report = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": f"python -m benchmarks.segment_pipeline --images {options.images} --size {options.size} "
                   f"--repeats {options.repeats}",
        "images": options.images, "size": options.size, "rates_images_per_s": rates, "best": best,
        "pipeline_over_decode_and_write": round(ratio, 3),
    }
    path = options.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                          f"segment-pipeline-{report['date']}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
