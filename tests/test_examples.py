"""Every code example in README.md and in the package's docstrings runs, as written.

``BAAI/seggpt-vit-large`` resolves, offline, to a tiny random-weight checkpoint written by transformers
and laid into a huggingface_hub cache under that name, so the examples keep the real Hub id. Each
README Python block runs as its own script in a fresh folder that holds the repository's examples/ (as
a clone does); docstring examples are doctests (``>>>``), run the same way.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import seggpt_jax
from seggpt_jax_testing.hub import fill_hub_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def readme_blocks() -> list[tuple[int, str]]:
    text = open(README, encoding="utf-8").read()
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def docstring_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(seggpt_jax.__path__, "seggpt_jax."):
        module = importlib.import_module(info.name)
        if doctest.DocTestFinder().find(module) and any(t.examples for t in doctest.DocTestFinder().find(module)):
            names.append(info.name)
    return names


@pytest.fixture(scope="module")
def example_env(hf_tiny, tmp_path_factory):
    from seggpt_jax_testing.transformers_harness import hf_processor_config

    hf, path = hf_tiny("nonsquare")
    cache = str(tmp_path_factory.mktemp("hub"))
    files = {name: os.path.join(path, name) for name in ("config.json", "model.safetensors")}
    files["preprocessor_config.json"] = hf_processor_config(hf.config, str(tmp_path_factory.mktemp("processor")))
    fill_hub_cache(cache, "BAAI/seggpt-vit-large", files)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def test_the_readme_has_examples():
    assert len(readme_blocks()) >= 4


@pytest.mark.parametrize("line, code", readme_blocks(), ids=lambda v: f"README.md:{v}" if isinstance(v, int) else "")
def test_readme_example_runs(example_env, tmp_path, line, code):
    script = tmp_path / f"readme_{line}.py"
    script.write_text(code)
    os.symlink(os.path.join(REPO, "examples"), tmp_path / "examples")  # as in a clone; what it writes stays here
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=example_env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"README.md line {line}:\n{code}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("module", docstring_modules())
def test_docstring_examples_run(example_env, module):
    code = (f"import doctest, sys, importlib\nm = importlib.import_module({module!r})\n"
            "r = doctest.testmod(m, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)\n"
            "sys.exit(1 if r.failed else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=example_env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
