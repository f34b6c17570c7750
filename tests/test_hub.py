"""Hub repo ids resolve from a pre-filled huggingface_hub cache offline, and fail fast without one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from seggpt_jax import ModelNotFoundError, SegGptForImageSegmentation
from seggpt_jax.weights import flat_parameters
from seggpt_jax_testing.hub import fill_hub_cache

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


# ------------------------------------------------------------------------------------ single files, configs
@pytest.fixture
def hub_cache_with_processor(hf_tiny, tmp_path):
    _, path = hf_tiny("nonsquare")
    processor = tmp_path / "preprocessor_config.json"
    processor.write_text('{"image_processor_type": "SegGptImageProcessor", "size": {"height": 32, "width": 32}}')
    cache = str(tmp_path / "hub")
    fill_hub_cache(cache, "acme/seggpt-tiny", {"config.json": os.path.join(path, "config.json"),
                                               "model.safetensors": os.path.join(path, "model.safetensors"),
                                               "preprocessor_config.json": str(processor)})
    return cache


RESOLVE_FILES = """
    import json
    from seggpt_jax import ModelNotFoundError, SegGptConfig
    from seggpt_jax.weights import resolve_file
    print("PROCESSOR", json.load(open(resolve_file("acme/seggpt-tiny", "preprocessor_config.json")))["size"])
    print("OPTIONAL", resolve_file("acme/seggpt-tiny", "absent.json", required=False))
    config = SegGptConfig.from_pretrained("acme/seggpt-tiny")
    print("CONFIG", config.image_size, config.merge_index, config.intermediate_hidden_state_indices)
    for name, kwargs in [("absent.json", {}), ("config.json", {"revision": "v2"})]:
        try:
            resolve_file("acme/seggpt-tiny", name, required=False if kwargs else True, **kwargs)
        except ModelNotFoundError as e:
            print("ERROR", e.reason)
"""


@pytest.mark.parametrize("how", ["offline", "no network"])
def test_resolve_file_and_config_from_a_cached_repo(hub_cache_with_processor, how):
    env = {"HF_HUB_CACHE": hub_cache_with_processor}
    if how == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    result = _run(RESOLVE_FILES, env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "PROCESSOR {'height': 32, 'width': 32}"
    assert lines[1] == "OPTIONAL None"  # a cached snapshot without the file: the file is absent
    assert lines[2] == "CONFIG (64, 32) 2 (2, 4, 5)"  # TINY_CONFIGS["nonsquare"], as transformers wrote it
    why = "HF_HUB_OFFLINE is set" if how == "offline" else "cannot be reached"
    assert lines[3].startswith("ERROR cannot load 'acme/seggpt-tiny': absent.json is not in the Hugging Face cache")
    assert why in lines[3]
    # a revision the cache does not hold fails even for an optional file: nothing can be said about it
    assert lines[4].startswith("ERROR cannot load 'acme/seggpt-tiny@v2': it is not in the Hugging Face cache")
    assert len(lines) == 5 and "Retrying" not in result.stderr


def test_resolve_file_arguments_and_local_paths(hub_cache_with_processor, hf_tiny, tmp_path):
    from seggpt_jax.weights import resolve_file

    cache = hub_cache_with_processor
    found = resolve_file("acme/seggpt-tiny", "preprocessor_config.json", cache_dir=cache, local_files_only=True)
    assert found.startswith(cache) and found.endswith("preprocessor_config.json")
    with pytest.raises(ModelNotFoundError, match="cannot load 'acme/other': it is not in the Hugging Face cache"):
        resolve_file("acme/other", "config.json", cache_dir=cache, local_files_only=True, required=False)
    _, path = hf_tiny("nonsquare")
    assert resolve_file(path, "config.json") == os.path.join(path, "config.json")
    weights = os.path.join(path, "model.safetensors")
    assert resolve_file(weights, "config.json") == os.path.join(path, "config.json")  # the file beside it
    assert resolve_file(path, "preprocessor_config.json", required=False) is None
    with pytest.raises(ModelNotFoundError, match=f"{path}: no preprocessor_config.json in this folder"):
        resolve_file(path, "preprocessor_config.json")
    with pytest.raises(ModelNotFoundError, match="no such file or directory: /nonexistent/seggpt"):
        resolve_file("/nonexistent/seggpt", "config.json", required=False)
    with pytest.raises(ModelNotFoundError, match="neither an existing local path nor a Hugging Face repo id"):
        resolve_file("not a repo id!", "config.json")
