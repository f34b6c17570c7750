"""Writing files without ever losing one: atomic writes, the user's umask, and a record of what we wrote.

* :func:`atomic_save` writes to a temporary file beside the target and renames it over the target,
  so a file appears complete or not at all; the result gets the permissions any new file would get
  under the process umask (``mkstemp`` alone would leave it 0600).
* :class:`OutputFolder` is a folder the tool writes into. It keeps a record of the files it wrote
  (``.seggpt-jax-outputs.jsonl``: name, size, modification time), so that a rerun replaces only files
  the tool itself wrote and never one a user put there or changed since, and so that a rerun whose
  inputs are that folder skips the tool's own outputs (:func:`written_by_us`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator

MANIFEST = ".seggpt-jax-outputs.jsonl"
_umask_lock = threading.Lock()


def process_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    return 0o666 & ~process_umask()


def atomic_save(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``.

    On any error (or interruption) the temporary file is removed and ``path`` is left as it was. The
    file ends with the mode a newly created file gets under the umask.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def staging_folder(inside: str) -> Iterator[str]:
    """A temporary folder inside ``inside`` (same file system, so its files can be renamed into place);
    removed with whatever is left in it."""
    folder = tempfile.mkdtemp(prefix=".staging-", dir=inside)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class OutputConflict(OSError):
    """A file the tool would write exists: not written by it (or changed since), or written by an earlier
    run while replacing is off (``ours``)."""

    def __init__(self, message: str, *, ours: bool):
        super().__init__(message)
        self.ours = ours

    def __str__(self) -> str:
        return self.args[0]


def _stamp(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def _read_manifest(folder: str) -> dict[str, tuple[int, int]]:
    records: dict[str, tuple[int, int]] = {}
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    records[str(entry["name"])] = (int(entry["size"]), int(entry["mtime_ns"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interruption: that file counts as not ours
    except (FileNotFoundError, NotADirectoryError):
        pass
    return records


def written_by_us(path: str | os.PathLike, _cache: dict | None = None) -> bool:
    """Whether ``path`` is a file this tool wrote (recorded in its folder's manifest, unchanged since)."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    records = _cache.setdefault(folder, _read_manifest(folder)) if _cache is not None else _read_manifest(folder)
    stamp = records.get(name)
    if stamp is None:
        return False
    try:
        return _stamp(path) == stamp
    except OSError:
        return False


class OutputFolder:
    """A folder the tool writes into, which remembers the files it wrote.

    ``overwrite`` says whether files this tool wrote earlier may be replaced; files it did not write
    are never replaced, whatever ``overwrite`` says (:class:`OutputConflict`).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = True):
        self.path = os.fspath(path)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise OutputConflict(f"output folder {self.path} exists and is not a folder", ours=False)
        self.overwrite = overwrite
        self._records = _read_manifest(self.path)

    def create(self) -> str:
        """Make the folder (mode from the umask); called by the first write, so a run that fails before
        writing anything leaves nothing behind."""
        os.makedirs(self.path, exist_ok=True)
        return self.path

    def owns(self, name: str) -> bool:
        stamp = self._records.get(name)
        target = os.path.join(self.path, name)
        try:
            return stamp is not None and _stamp(target) == stamp
        except OSError:
            return False

    def check(self, name: str) -> str:
        """The target path, if ``name`` may be written; else :class:`OutputConflict` saying why."""
        target = os.path.join(self.path, name)
        if os.path.lexists(target):
            if not self.owns(name):
                raise OutputConflict(f"{target} exists and was not written by seggpt-jax (or was changed since); "
                                     f"it is left alone: choose another output folder or move it away", ours=False)
            if not self.overwrite:
                raise OutputConflict(f"{target} exists (written by an earlier run); pass --overwrite to replace it",
                                     ours=True)
        return target

    def write(self, name: str, write: Callable[[str], None]) -> str:
        """Atomically write ``name`` with ``write(tmp_path)`` and record it; returns the path."""
        target = self.check(name)
        self.create()
        atomic_save(target, write)
        self._record(name, target)
        return target

    def adopt(self, name: str, source: str) -> str:
        """Move a finished file (on the same file system, e.g. from :func:`staging_folder`) in as ``name``."""
        target = self.check(name)
        os.chmod(source, new_file_mode())
        os.replace(source, target)
        self._record(name, target)
        return target

    def _record(self, name: str, target: str) -> None:
        size, mtime = _stamp(target)
        self._records[name] = (size, mtime)
        with open(os.path.join(self.path, MANIFEST), "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "size": size, "mtime_ns": mtime}) + "\n")
