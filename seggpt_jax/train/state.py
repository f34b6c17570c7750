"""Training state on disk: one format for any pytree of arrays, and checkpoint folders written atomically.

* :func:`save_tree` / :func:`load_tree`: a pytree (an ``nnx.Optimizer``'s state, an optax state, a
  dict of prompt arrays) as safetensors, each array keyed by its pytree path
  (``opt_state.0.mu.model.encoder.layers.3.attention.qkv.kernel.value``). Loading matches keys
  against a template of the same structure, so a changed optimizer is reported by name, never read
  by position.
* checkpoints are folders written whole (:func:`seggpt_jax.files.replace_folder`); with the run's ``latest`` pointer
  written only after a checkpoint is complete (:func:`point_latest`), an interrupted save never costs
  the previous checkpoint.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import jax
import numpy as np

from ..files import atomic_save, text_writer
from ..weights import path_key, read_safetensors, write_safetensors

LATEST = "latest"


def tree_arrays(tree: Any) -> dict[str, np.ndarray]:
    """``{path: host array}`` for every leaf of ``tree``."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_key(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}


def save_tree(path: str, tree: Any, metadata: dict[str, str] | None = None, *, output=None) -> None:
    """Write ``tree``'s arrays keyed by path (atomically) with string ``metadata`` in the header;
    through ``output`` (an :class:`~seggpt_jax.files.OutputFolder` holding ``path``) when given, so that
    the file is recorded as the tool's and never replaces someone else's."""
    arrays = tree_arrays(tree)
    save_output(path, lambda tmp: write_safetensors(tmp, arrays, metadata or {}), output)


def save_output(path: str, write, output=None) -> None:
    """``write(tmp)`` atomically to ``path``: through ``output`` (replacing only the tool's own file of
    that name) when given, else straight (the caller named the path)."""
    if output is None:
        atomic_save(path, write)
    else:
        output.write(os.path.basename(path), write, replace=True)


def load_tree(path: str, template: Any) -> tuple[Any, dict[str, str]]:
    """The tree saved at ``path``, with ``template``'s structure (and dtypes), and the file's metadata."""
    arrays, metadata = read_safetensors(path)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {path_key(p): leaf for p, leaf in leaves}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    wrong = [f"{k}: file {arrays[k].shape}, expected {tuple(np.shape(expected[k]))}" for k in expected
             if k in arrays and arrays[k].shape != tuple(np.shape(expected[k]))]
    if missing or unexpected or wrong:
        problems = [f"{title} {items[:5]}{' ...' if len(items) > 5 else ''}"
                    for title, items in (("missing", missing), ("unexpected", unexpected), ("shapes", wrong)) if items]
        raise ValueError(f"{path} does not match this state (was the optimizer or the trainable set changed?): "
                         + "; ".join(problems))
    values = [np.asarray(arrays[path_key(p)]).astype(np.asarray(leaf).dtype) for p, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, values), metadata


def point_latest(run_dir: str, name: str, *, output=None) -> None:
    """Atomically make ``run_dir/latest`` name the checkpoint folder ``name`` (written last; through
    ``output``, the run's :class:`~seggpt_jax.files.OutputFolder`, when given)."""
    path = os.path.join(run_dir, LATEST)
    save_output(path, text_writer(name + "\n"), output)


CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")


def prune_checkpoints(run, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` of the tool's own ``step_N`` checkpoint folders in the run's
    :class:`~seggpt_jax.files.OutputFolder` ``run`` (never the one ``latest`` names, never a folder
    someone else made). Each goes aside first, so an interruption never leaves half of one under its
    name. Returns the names removed."""
    latest = None
    if run.owns(LATEST):
        with open(run.target(LATEST), encoding="utf-8") as f:
            latest = f.read().strip()
    ours = sorted((int(m.group(1)), name) for name in run.names("folder") if (m := CHECKPOINT_NAME.match(name)))
    removed = []
    for _, name in ours[:max(0, len(ours) - keep)]:
        if name != latest and run.remove(name):
            removed.append(name)
    return removed


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder from itself, a run folder (through its ``latest``), or the ``latest`` file.

    If the folder is missing because a save of the same name was interrupted between moving it aside
    and moving its successor in (:func:`seggpt_jax.files.replace_folder`), the folder moved aside is used.
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


# ------------------------------------------------------------------------------------ the loop's bookkeeping
def due(step: int, every: int, end: int) -> bool:
    """Whether step ``step`` (counted from 1) is one of every ``every``, or the last (``end``)."""
    return step % every == 0 or step == end


class LossLog:
    """The losses of a training loop since its last record, and the record every ``every`` steps and at
    ``end``: ``{"step", "loss" (the mean since the last record), "seconds" (since the loop began)}``. One
    bookkeeping for fine-tuning and prompt tuning."""

    def __init__(self, every: int, end: int):
        self.every, self.end = every, end
        self._losses: list = []
        self._start = time.perf_counter()

    def add(self, step: int, loss) -> dict | None:
        """Note step ``step``'s loss (a device scalar: read only when a record is due); the record, if due."""
        self._losses.append(loss)
        if not due(step, self.every, self.end):
            return None
        record = {"step": step, "loss": float(np.mean([float(v) for v in self._losses])),
                  "seconds": round(time.perf_counter() - self._start, 3)}
        self._losses = []
        return record
