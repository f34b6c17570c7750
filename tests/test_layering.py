"""The package's layering, as README.md states it, read from every import (top level and inside
functions) with ``ast``: a module imports only modules of lower layers (or of its own layer), and
function-level imports of the package's own modules remain only where a reason is written here."""

from __future__ import annotations

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "seggpt_jax")

#: Bottom to top; a module may import its own layer's modules and lower ones. README.md says the same
#: (the line under "Layout of the code"), and the test checks that it does.
LAYERS = [
    ("version", "arrays", "files", "hub", "runtime", "config"),
    ("nn",),
    ("weights",),
    ("imaging",),
    ("export",),
    ("models",),
    ("data",),
    ("inference", "parallel"),
    ("train", "eval"),
    ("serve",),
    ("cli",),
]

#: Where importing inside a function is allowed, and why (one reason per module).
LAZY = {
    "seggpt_jax.export": "a server copies this one file and runs load() with only jax, numpy and safetensors: "
                         "the builder's imports load when the builder runs",
    "seggpt_jax.cli.main": "--help and --version answer without starting JAX (benchmarks/cli_startup.py)",
    "seggpt_jax.cli.common": "--help and --version answer without starting JAX (benchmarks/cli_startup.py)",
    "seggpt_jax.cli.segment": "--help and --version answer without starting JAX (benchmarks/cli_startup.py)",
    "seggpt_jax.cli.train": "--help and --version answer without starting JAX (benchmarks/cli_startup.py)",
    "seggpt_jax.cli.convert": "--help and --version answer without starting JAX (benchmarks/cli_startup.py)",
    "seggpt_jax.cli.export": "--help and --version answer without starting JAX (benchmarks/cli_startup.py)",
    "seggpt_jax.cli.serve": "--help and --version answer without starting JAX or the serving stack",
    "seggpt_jax.cli.parity": "torch and transformers are optional: loaded only for a parity report",
}


def _rank(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself: its names load lazily (seggpt_jax/__init__.py)
    for rank, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to README.md")


def _imports() -> list[tuple[str, str, bool, int]]:
    """``(module, imported module, inside a function, line)`` for every import of the package's own modules."""
    found = []
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
            module = module[:-len(".__init__")] if module.endswith(".__init__") else module
            package = module if name == "__init__.py" else module.rsplit(".", 1)[0]
            tree = ast.parse(open(path, encoding="utf-8").read())
            nested = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for inner in ast.walk(node) if inner is not node}
            for node in ast.walk(tree):
                targets = []
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    targets = [f"{target}.{a.name}" if not node.module else target for a in node.names]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("seggpt_jax"):
                    targets = [node.module]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names if a.name.startswith("seggpt_jax")]
                for target in targets:
                    found.append((module, target, id(node) in nested, node.lineno))
    return found


IMPORTS = _imports()


def test_imports_run_one_way():
    upward = []
    for module, target, _, line in IMPORTS:
        source, imported = _rank(module), _rank(target)
        if source is not None and imported is not None and imported > source:
            upward.append(f"{module}:{line} imports {target} (layer {imported} > {source})")
    assert not upward, "\n".join(upward)


def test_the_model_package_is_a_leaf():
    """nn imports nothing of weights, imaging, data, inference, train, eval, export, models, serve, cli."""
    allowed = set(LAYERS[0]) | {"nn"}
    leaks = [f"{m}:{line} imports {t}" for m, t, _, line in IMPORTS
             if m.startswith("seggpt_jax.nn") and t.split(".")[1] not in allowed]
    assert not leaks, "\n".join(leaks)


def test_function_level_imports_have_a_reason():
    lazy = sorted({f"{m}:{line} imports {t}" for m, t, inside, line in IMPORTS if inside and m not in LAZY})
    assert not lazy, "import these at the top of the module (or give the module a reason in LAZY):\n" + \
        "\n".join(lazy)


def test_no_module_imports_the_package_init():
    """The version has its own home (seggpt_jax/version.py); nothing needs the lazy package namespace."""
    offenders = [f"{m}:{line}" for m, t, _, line in IMPORTS if t == "seggpt_jax" and m != "seggpt_jax"]
    assert not offenders, offenders


def test_readme_states_the_layering_this_test_enforces():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    line = re.search(r"^Imports run one way[^\n]*: (.+)$", readme, re.M)
    assert line, "README.md has no 'Imports run one way ...: ...' line"
    stated = [tuple(re.findall(r"`([a-z_]+)`", layer)) for layer in line.group(1).split("<-")]
    assert stated == LAYERS, (stated, LAYERS)


@pytest.mark.parametrize("module, reason", sorted(LAZY.items()))
def test_every_lazy_module_exists(module, reason):
    path = os.path.join(REPO, *module.split(".")) + ".py"
    assert os.path.isfile(path) and reason
