"""Hub repo ids resolve from a pre-filled huggingface_hub cache offline, and fail fast without one."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from seggpt_jax import ModelNotFoundError, SegGptForImageSegmentation
from seggpt_jax.weights import flat_parameters

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(cache: str, repo_id: str, files: dict[str, str]) -> None:
    """Lay files out the way huggingface_hub caches a download: blobs, a snapshot of links, refs/main."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(snapshot, exist_ok=True)
    for name, source in files.items():
        digest = hashlib.sha256(open(source, "rb").read()).hexdigest()
        shutil.copy(source, os.path.join(repo, "blobs", digest))
        os.symlink(os.path.join("..", "..", "blobs", digest), os.path.join(snapshot, name))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once we return: connections are refused at once


@pytest.fixture
def hub_cache(hf_tiny, tmp_path):
    _, path = hf_tiny("nonsquare")
    cache = str(tmp_path / "hub")
    fill_hub_cache(cache, "acme/seggpt-tiny", {name: os.path.join(path, name)
                                                for name in ("config.json", "model.safetensors")})
    return cache, path


def _run(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(env_extra)
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


LOAD_AND_SUM = """
    import numpy as np
    from seggpt_jax import SegGptForImageSegmentation
    from seggpt_jax.weights import flat_parameters
    model = SegGptForImageSegmentation.from_pretrained("acme/seggpt-tiny")
    print("SUM", sum(float(np.asarray(v[...], np.float64).sum()) for v in flat_parameters(model).values()))
"""


def _expected_sum(path: str) -> float:
    model = SegGptForImageSegmentation.from_pretrained(path)
    return sum(float(np.asarray(v[...], np.float64).sum()) for v in flat_parameters(model).values())


def _printed_sum(result: subprocess.CompletedProcess) -> float:
    assert result.returncode == 0, result.stderr
    return float(result.stdout.split("SUM")[1])


def test_repo_id_resolves_from_cache_in_offline_mode(hub_cache):
    cache, path = hub_cache
    result = _run(LOAD_AND_SUM, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache})
    assert _printed_sum(result) == pytest.approx(_expected_sum(path), rel=1e-12)


def test_unreachable_hub_falls_back_to_the_cache_without_retrying(hub_cache):
    cache, path = hub_cache
    result = _run(LOAD_AND_SUM, {"HF_HUB_CACHE": cache, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    assert _printed_sum(result) == pytest.approx(_expected_sum(path), rel=1e-12)
    assert "Retrying" not in result.stderr


def test_cache_dir_and_local_files_only_arguments(hub_cache):
    cache, path = hub_cache
    model = SegGptForImageSegmentation.from_pretrained("acme/seggpt-tiny", cache_dir=cache, local_files_only=True)
    expected = SegGptForImageSegmentation.from_pretrained(path)
    for (key, a), b in zip(flat_parameters(model).items(), flat_parameters(expected).values()):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=key)
    with pytest.raises(ModelNotFoundError, match="acme/seggpt-tiny@v2.*not in the Hugging Face cache"):
        SegGptForImageSegmentation.from_pretrained("acme/seggpt-tiny", cache_dir=cache, local_files_only=True,
                                                   revision="v2")


FAIL = """
    from seggpt_jax import SegGptForImageSegmentation, ModelNotFoundError
    try:
        SegGptForImageSegmentation.from_pretrained("BAAI/seggpt-vit-large")
    except ModelNotFoundError as e:
        print("ERROR", e)
"""


@pytest.mark.parametrize("how", ["offline", "no network"])
def test_no_cache_fails_fast_and_says_how_to_pass_a_local_path(tmp_path, how):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty")}
    if how == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    result = _run(FAIL, env)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "ERROR cannot load 'BAAI/seggpt-vit-large'" in message
    assert ("HF_HUB_OFFLINE is set" if how == "offline" else "cannot be reached") in message
    assert "pass its local path" in message and "from_pretrained('/path/to/seggpt_vit_large.pth')" in message
    assert "Retrying" not in result.stderr  # huggingface_hub's backoff (20 s and more) was never entered
