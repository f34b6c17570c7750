"""Peak memory of ``seggpt-jax video`` against clip length: frames are streamed, so it must not grow.

    python -m benchmarks.video_memory --model /path/to/checkpoint [--frames 40] [--size 720x1280]

Writes a synthetic mp4 of N and 5N frames (a square moving over texture), runs the command on each in
a fresh process, and reports each process's peak resident memory (VmHWM / ru_maxrss) and the ratio.
Without ``--model`` a tiny random-weight checkpoint written by transformers is used (the memory that
could grow with the clip is the frames', not the model's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

_CHILD = """
import resource, sys
from seggpt_jax.cli import main
code = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def write_clip(path: str, frames: int, size: tuple[int, int], rate: int = 25) -> None:
    """An H.264 mp4 of a bright square moving over a fixed texture."""
    import av

    height, width = size
    background = np.random.default_rng(0).integers(0, 120, (height, width, 3), dtype=np.uint8)
    side = height // 3
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            frame = background.copy()
            left = (width // 12 + 7 * t) % max(width - side, 1)
            frame[height // 5:height // 5 + side, left:left + side] = (250, 240, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def first_frame_mask(path: str, size: tuple[int, int]) -> None:
    from PIL import Image

    height, width = size
    mask = np.zeros((height, width), np.uint8)
    side = height // 3
    mask[height // 5:height // 5 + side, width // 12:width // 12 + side] = 255
    Image.fromarray(mask, "L").save(path)


def peak_rss_of_video_run(model: str, clip: str, mask: str, out_dir: str, *extra: str) -> int:
    """Peak RSS (bytes) of one ``seggpt-jax video`` process."""
    command = [sys.executable, "-c", _CHILD, "video", clip, "--prompt-mask", mask, "--out-dir", out_dir,
               "--model", model, *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"video run failed ({result.returncode}): {result.stderr[-2000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) * 1024


def measure(model: str, frames: int, size: tuple[int, int], workdir: str, *extra: str) -> dict:
    """Peak RSS for a clip of ``frames`` and one of ``5 * frames``, and their ratio."""
    mask = os.path.join(workdir, "mask.png")
    first_frame_mask(mask, size)
    peaks = {}
    for count in (frames, 5 * frames):
        clip = os.path.join(workdir, f"clip{count}.mp4")
        write_clip(clip, count, size)
        peaks[count] = peak_rss_of_video_run(model, clip, mask, os.path.join(workdir, f"out{count}"), *extra)
    return {"frames": [frames, 5 * frames], "size": list(size), "peak_rss_bytes": [peaks[frames], peaks[5 * frames]],
            "ratio": peaks[5 * frames] / peaks[frames]}


def _tiny_checkpoint(folder: str) -> str:
    from seggpt_jax_testing.transformers_harness import TINY_CONFIGS, HFConfig, make_hf_model

    make_hf_model(HFConfig(**TINY_CONFIGS["nonsquare"])).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: a tiny random-weight one written by transformers)")
    parser.add_argument("--frames", type=int, default=40, help="the short clip's length; the long one is 5x")
    parser.add_argument("--size", default="720x1280", help="frame size HEIGHTxWIDTH")
    parser.add_argument("--context-frames", type=int, default=2)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as workdir:
        model = args.model or _tiny_checkpoint(os.path.join(workdir, "tiny"))
        result = measure(model, args.frames, size, workdir, "--context-frames", str(args.context_frames))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
