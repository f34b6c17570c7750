"""Training state on disk: one format for any pytree of arrays, and checkpoint folders written atomically.

* :func:`save_tree` / :func:`load_tree`: a pytree (an ``nnx.Optimizer``'s state, an optax state, a
  dict of prompt arrays) as safetensors, each array keyed by its pytree path
  (``opt_state.0.mu.model.encoder.layers.3.attention.qkv.kernel.value``). Loading matches keys
  against a template of the same structure, so a changed optimizer is reported by name, never read
  by position.
* :func:`write_folder` fills a staging folder and swaps it in; with the run's ``latest`` pointer
  written only after a checkpoint is complete (:func:`point_latest`), an interrupted save never costs
  the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ..files import atomic_save, process_umask
from ..weights import read_safetensors

LATEST = "latest"


def _key(path: tuple) -> str:
    return ".".join(str(getattr(part, "key", getattr(part, "idx", getattr(part, "name", part)))) for part in path)


def tree_arrays(tree: Any) -> dict[str, np.ndarray]:
    """``{path: host array}`` for every leaf of ``tree``."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_key(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}


def save_tree(path: str, tree: Any, metadata: dict[str, str] | None = None) -> None:
    """Write ``tree``'s arrays keyed by path (atomically) with string ``metadata`` in the header."""
    from safetensors.numpy import save_file

    arrays = tree_arrays(tree)
    atomic_save(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))


def load_tree(path: str, template: Any) -> tuple[Any, dict[str, str]]:
    """The tree saved at ``path``, with ``template``'s structure (and dtypes), and the file's metadata."""
    arrays, metadata = read_safetensors(path)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {_key(p): leaf for p, leaf in leaves}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    wrong = [f"{k}: file {arrays[k].shape}, expected {tuple(np.shape(expected[k]))}" for k in expected
             if k in arrays and arrays[k].shape != tuple(np.shape(expected[k]))]
    if missing or unexpected or wrong:
        problems = [f"{title} {items[:5]}{' ...' if len(items) > 5 else ''}"
                    for title, items in (("missing", missing), ("unexpected", unexpected), ("shapes", wrong)) if items]
        raise ValueError(f"{path} does not match this state (was the optimizer or the trainable set changed?): "
                         + "; ".join(problems))
    values = [np.asarray(arrays[_key(p)]).astype(np.asarray(leaf).dtype) for p, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, values), metadata


def write_folder(directory: str, fill: Callable[[str], None]) -> None:
    """``fill(staging)`` writes a complete folder, which then takes ``directory``'s place.

    A folder already at ``directory`` is moved aside first and removed only once the new one is in
    place; an interruption leaves either the old folder (perhaps under its aside name, with the
    staging folder beside it) or the new one, never a half-written folder under ``directory``.
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=parent)
    aside = None
    try:
        fill(staging)
        os.chmod(staging, 0o777 & ~process_umask())  # mkdtemp makes it 0700
        if os.path.lexists(directory):
            aside = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
            os.rmdir(aside)
            os.replace(directory, aside)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def point_latest(run_dir: str, name: str) -> None:
    """Atomically make ``run_dir/latest`` name the checkpoint folder ``name`` (written last)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")

    atomic_save(os.path.join(run_dir, LATEST), write)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder from itself, a run folder (through its ``latest``), or the ``latest`` file.

    If the folder is missing because a save of the same name was interrupted between moving it aside
    and moving its successor in (:func:`write_folder`), the folder moved aside is used.
    """
    if os.path.basename(os.path.normpath(path)) == LATEST and os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    pointer = os.path.join(path, LATEST)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.exists(path):
        parent, name = os.path.split(os.path.abspath(path))
        aside = sorted(entry for entry in os.listdir(parent) if entry.startswith(f".{name}.old-")) \
            if os.path.isdir(parent) else []
        if aside:
            return os.path.join(parent, aside[-1])
    return path


def write_json(path: str, data: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_save(path, write)

