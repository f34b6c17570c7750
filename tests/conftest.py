"""Shared fixtures: random-weight checkpoints written by transformers itself, in every layout.

The session's persistent compilation cache is set up first (:mod:`seggpt_jax_testing.compilation_cache`).

Nothing here is produced by the code under test: transformers builds and saves the models
(:mod:`seggpt_jax_testing.transformers_harness`, which also keeps the original-BAAI rename list,
independent of ``seggpt_jax.weights.tables``).
"""

from __future__ import annotations

from seggpt_jax_testing import compilation_cache

compilation_cache.configure()  # before JAX initialises: the session and every process it starts share it

import os  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from seggpt_jax_testing.transformers_harness import (  # noqa: E402, F401  (re-exported for the test modules)
    TINY_CONFIGS, HFConfig, HFModel, make_hf_model, to_original_names, write_checkpoint)

#: Float32 parity (against transformers on torch's CPU, or between our own code paths) holds to 1e-5 only
#: with float32 matmuls; the default on a GPU is TF32, on a TPU one bfloat16 pass. There, the session and
#: every process it starts run float32 matmuls at "highest" unless a model sets its own precision (as
#: ``precision="highest"`` does); tests of the precision option itself lower under an explicit default.
PARITY_MATMUL_PRECISION = None if jax.default_backend() == "cpu" else "highest"
if PARITY_MATMUL_PRECISION:
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = PARITY_MATMUL_PRECISION
    jax.config.update("jax_default_matmul_precision", PARITY_MATMUL_PRECISION)


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """``hf_tiny(name, fmt="safetensors") -> (transformers model, path)``, cached per session."""
    models: dict[str, HFModel] = {}
    paths: dict[tuple[str, str], str] = {}

    def get(name: str, fmt: str = "safetensors"):
        if name not in models:
            models[name] = make_hf_model(HFConfig(**TINY_CONFIGS[name]))
        if (name, fmt) not in paths:
            folder = str(tmp_path_factory.mktemp(f"{name}-{fmt}"))
            paths[(name, fmt)] = write_checkpoint(models[name], folder, fmt)
        return models[name], paths[(name, fmt)]

    return get


def random_inputs(config, batch: int, seed: int = 0, labels: bool = False) -> dict[str, np.ndarray]:
    """NCHW float32 inputs for a config (ours or transformers')."""
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    shape = (batch, config.num_channels, size[0] // 2, size[1])
    rng = np.random.default_rng(seed)
    out = {name: rng.standard_normal(shape, dtype=np.float32)
           for name in ("pixel_values", "prompt_pixel_values", "prompt_masks")}
    if labels:
        out["labels"] = rng.standard_normal(shape, dtype=np.float32)
    return out


def random_bool_masked_pos(num_patches: int, batch: int, ratio: float = 0.75, seed: int = 0) -> np.ndarray:
    """``[batch, num_patches]`` with ``int(ratio * num_patches)`` random patches masked per row."""
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, num_patches), dtype=bool)
    for row in out:
        row[rng.permutation(num_patches)[: int(num_patches * ratio)]] = True
    return out


def to_torch(arrays: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}


def max_abs(a, b) -> float:
    a = np.asarray(a, dtype=np.float32)
    b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


def moving_square_clip(frames: int, size: tuple[int, int], step: int, seed: int = 0):
    """A bright square moving right over a textured background: (frames, first frame's bool mask)."""
    height, width = size
    background = np.random.default_rng(seed).integers(0, 120, (height, width, 3), dtype=np.uint8)
    side, top, left = height // 3, height // 5, width // 12
    clip = []
    for t in range(frames):
        frame = background.copy()
        frame[top:top + side, left + step * t:left + side + step * t] = (250, 240, 30)
        clip.append(frame)
    mask = np.zeros((height, width), bool)
    mask[top:top + side, left:left + side] = True
    return clip, mask


def save_image(path, array, mode=None) -> str:
    """Write an array as an image file (its format from the name; ``mode``: PIL's) and return its path."""
    from PIL import Image

    Image.fromarray(array, mode=mode).save(path)
    return str(path)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for loopback servers and coordinators)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(commands: list[list[str]], env: dict[str, str], timeout: float = 600) -> list[tuple[str, str]]:
    """Start every command at once (the processes of one ``jax.distributed`` job), wait for all, and return
    their (stdout, stderr); a process that fails fails the test with its stderr, and none is left running."""
    import subprocess

    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for command in commands]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err[-3000:]
            outputs.append((out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


def result_lines(outputs: list[tuple[str, str]]) -> list:
    """The JSON of every ``RESULT {...}`` line the processes printed."""
    import json

    return [json.loads(line[len("RESULT "):]) for out, _ in outputs for line in out.splitlines()
            if line.startswith("RESULT ")]


#: The test files that take longest (serial seconds on 2 cores, `--durations`, 2026-12-03), run first: with
#: `-n 2 --dist loadfile` each file goes to one worker in collection order, so a long file collected last
#: would leave one worker running it alone at the end. Order only; every test still runs.
LONG_FILES = ("test_training.py", "test_runtime.py", "test_data_parallel.py", "test_parity_vit_large.py",
              "test_scaling.py", "test_parallel.py", "test_export_transformers.py", "test_examples.py",
              "test_train_memory.py", "test_trust.py", "test_scan_layers.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: a file's own order is kept
