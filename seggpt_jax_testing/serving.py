"""Test support for the HTTP service: a checkpoint whose masks have content, and a real server process.

The checkpoint is transformers' own (``save_pretrained``), from the tiny ``nonsquare`` config, with the
decoder's output head scaled so that the painted answer spreads over the whole colour range: random
weights otherwise paint everything a muddy grey, every binary mask comes out empty, and a test that
compares masks could not tell one answer from another.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import torch

from .transformers_harness import TINY_CONFIGS, HFConfig, make_hf_model, write_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def write_serving_checkpoint(folder: str, *, config: str | HFConfig = "nonsquare", contrast: float = 8.0,
                             seed: int = 0, samples: int = 8) -> str:
    """A random-weight transformers checkpoint whose masks are neither empty nor full (see module doc).
    ``config``: a name in ``TINY_CONFIGS`` or a transformers config (``HFConfig()`` is ViT-L)."""
    hf = make_hf_model(HFConfig(**TINY_CONFIGS[config]) if isinstance(config, str) else config, seed=seed)
    height, width = hf.config.image_size
    head = hf.decoder.decoder_pred.head
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(samples, 3, height // 2, width, generator=generator) for _ in range(3)]
    with torch.no_grad():
        head.weight.mul_(contrast)
        head.bias.mul_(contrast)
        pred = hf(pixel_values=inputs[0], prompt_pixel_values=inputs[1], prompt_masks=inputs[2]).pred_masks
        centre = pred[:, :, height // 2:].mean((0, 2, 3))
        head.bias.add_((0.5 - mean) / std - centre)  # mid-grey on average: binary masks about half full
    return write_checkpoint(hf, folder, "safetensors")


class ServerProcess:
    """``seggpt-jax serve`` in a subprocess on 127.0.0.1 (a free port), its log in a file.

    ``start()`` waits (bounded) until ``/readyz`` answers 200; ``stop()`` sends SIGTERM and returns the
    exit status (killing the process if it does not end within ``timeout``).
    """

    def __init__(self, model: str, log_path: str, *args: str, env: dict[str, str] | None = None):
        self.model, self.log_path, self.args = model, log_path, args
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self, timeout: float = 240.0) -> "ServerProcess":
        self.log = open(self.log_path, "w")
        command = [sys.executable, "-m", "seggpt_jax.cli.main", "serve", self.model, "--host", "127.0.0.1",
                   "--port", "0", *self.args]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while self.url is None:
            self._check_alive()
            found = re.search(r"listening on (http://\S+)", self.text())
            if found:
                self.url = found.group(1)
            elif time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"the server did not start in {timeout:.0f}s:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        self.wait_ready(deadline)
        return self

    def wait_ready(self, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"the server was not ready in time:\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.text()[-3000:]}")

    def text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.terminate()
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def session_checkpoint(tmp_path_factory) -> str:
    """:func:`write_serving_checkpoint` once per pytest session (shared by every serve test module)."""
    folder = tmp_path_factory.getbasetemp() / "serve-model"
    if not (folder / "model.safetensors").exists():
        write_serving_checkpoint(str(folder))
    return str(folder)


def session_cache(tmp_path_factory=None) -> str:
    """The session's persistent compilation cache (:mod:`seggpt_jax_testing.compilation_cache`), for a
    server's ``--compilation-cache``: the one every other process of the session uses."""
    from .compilation_cache import folder

    return folder()

