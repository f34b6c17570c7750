"""One persistent XLA compilation cache for a test session and every process it starts.

:func:`configure` runs first thing in ``tests/conftest.py``, before JAX is imported: it sets JAX's own
environment variables, so the session reads them when JAX initialises and every subprocess (the CLI,
workers, the server, benchmark dry runs) inherits them. A program compiled once, by any of them, is
then read from disk by the others instead of compiled again.

The folder is ``$JAX_COMPILATION_CACHE_DIR`` when the caller set it (keep one across runs to start
warm), otherwise a new temporary folder removed when the session ends: CI starts from a fresh clone, so a
folder kept under the checkout would be as cold there, and a run's timing and compile behaviour do not
depend on what an earlier run of another version left behind.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

DIR = "JAX_COMPILATION_CACHE_DIR"
#: every program, however fast it compiled and however small: the tests compile many small ones
SETTINGS = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
#: A size limit turns on JAX's file lock (the ``filelock`` package, which torch brings) around every read
#: and write of an entry, so that no process reads an entry that another is still writing: several CLI
#: processes run at once in some tests.
LOCKED = {"JAX_COMPILATION_CACHE_MAX_SIZE": str(16 << 30)}
#: for a process that is killed at a random moment: an entry it leaves half-written would be read by
#: later processes (with a warning on their stderr), so such processes use no cache.
DISABLED = {"JAX_ENABLE_COMPILATION_CACHE": "false"}


def configure() -> str:
    """Set up the session's cache (see the module docstring) and return its folder."""
    if "jax" in sys.modules:  # too late for the environment: set the live configuration too
        import jax
    else:
        jax = None
    folder = os.environ.get(DIR)
    if not folder:
        folder = tempfile.mkdtemp(prefix="seggpt-jax-tests-xla-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ[DIR] = folder
    os.makedirs(folder, exist_ok=True)
    settings = {**SETTINGS, **(LOCKED if importlib.util.find_spec("filelock") else {})}
    for name, value in settings.items():
        os.environ.setdefault(name, value)
    if jax is not None:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                          int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
        if "JAX_COMPILATION_CACHE_MAX_SIZE" in os.environ:
            jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
    return folder


def folder() -> str:
    """The session's cache folder (after :func:`configure`)."""
    return os.environ[DIR]


def without_cache(env: dict[str, str] | None = None) -> dict[str, str]:
    """A subprocess environment (``os.environ`` by default) with the persistent cache turned off."""
    return {**(os.environ if env is None else env), **DISABLED}
