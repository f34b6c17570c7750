"""The wheel holds the library only (with the demo page as package data); importing it (every module) loads
neither torch nor transformers, and ``import seggpt_jax``, the command line's parser and the batcher load
none of the serving stack (fastapi, uvicorn, prometheus_client)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
SERVING = ("fastapi", "starlette", "uvicorn", "prometheus_client", "multipart", "python_multipart", "pydantic")
import seggpt_jax
assert seggpt_jax.__file__.startswith(sys.argv[1]), seggpt_jax.__file__  # the wheel's copy, not the checkout
import seggpt_jax.serve, seggpt_jax.serve.batcher, seggpt_jax.serve.engine  # the parts a Ray deployment imports
from seggpt_jax.cli.main import build_parser
build_parser()
from seggpt_jax.data import fss1000_classes
assert len(fss1000_classes("test")) == 240  # package data read from the installed wheel
serving = sorted(name for name in sys.modules if name.split(".")[0] in SERVING)
print("SERVING", serving)  # only the server's own modules load the serving stack
for info in pkgutil.walk_packages(seggpt_jax.__path__, "seggpt_jax."):
    importlib.import_module(info.name)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "transformers"))
print("LOADED", loaded)
from importlib.resources import files
page = files("seggpt_jax.serve").joinpath("static", "index.html").read_text()
assert '<script src="demo.js">' in page and files("seggpt_jax.serve").joinpath("static", "demo.js").is_file()
"""


def test_wheel_contents_and_imports(tmp_path):
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out),
                    REPO], check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = list(out.glob("seggpt_jax-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"seggpt_jax"}, top  # no tests, testing, examples
    assert "seggpt_jax/nn/flash_attention.py" in names and "seggpt_jax/imaging/masks.py" in names
    assert {f"seggpt_jax/data/class_lists/fss1000_{s}.txt" for s in ("test", "val", "trn")} <= set(names)
    assert {"seggpt_jax/serve/static/index.html", "seggpt_jax/serve/static/demo.js"} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING, str(site)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(site)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout, result.stdout
    assert "SERVING []" in result.stdout, result.stdout
