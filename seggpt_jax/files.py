"""Writing files without ever losing one: atomic writes, the user's umask, and a record of what we wrote.

Every file and folder seggpt-jax writes goes through this module (one mechanism: models, configs,
masks, logs, reports, checkpoints).

* :func:`atomic_save` writes to a temporary file beside the target, flushes it to disk, and renames it
  over the target, so a file appears complete or not at all; it gets the permissions any new file
  gets under the process umask (``mkstemp`` alone would leave it 0600).
* :class:`OutputFolder` is a folder the tool writes into. It keeps a record of the files and folders
  it wrote (``.seggpt-jax-outputs.jsonl``, one JSON line each: name, size, modification time, inode,
  and optionally the job that wrote it and the input it came from). The record is written and flushed
  *before* the rename that makes an output appear, so an output that exists is always known to be
  ours, however the run was stopped. A file is the tool's while it is unchanged since (same size,
  modification time and inode); anything else is the user's, and is never replaced or deleted.
  A rerun whose inputs are that folder skips the tool's own outputs (:func:`written_by_us`).
  Several processes writing one folder at once (the shards of a cluster job, on a shared file system
  where appends from two hosts may interleave) each keep their own record file,
  ``.seggpt-jax-outputs.<writer>.jsonl``; every reader reads them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

MANIFEST = ".seggpt-jax-outputs.jsonl"
_umask_lock = threading.Lock()

# What :meth:`OutputFolder.status` says of an output name.
ABSENT = "absent"  # nothing there
OURS = "ours"  # written by this tool, unchanged since, by the same job (and from the same input)
STALE = "stale"  # written by this tool, unchanged since, but by another job or from an input changed since
FOREIGN = "foreign"  # someone else's (or ours, changed since): never replaced
OUTPUT_STATES_OURS = (OURS, STALE)


def process_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    return 0o666 & ~process_umask()


def new_folder_mode() -> int:
    return 0o777 & ~process_umask()


def fsync_folder(folder: str) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(path: str | os.PathLike, write: Callable[[str], None], *,
                before_rename: Callable[[str], None] | None = None) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    On any error (or interruption) the temporary file is removed and ``path`` is left as it was. The
    file ends with the mode a newly created file gets under the umask. ``before_rename(tmp)`` runs
    once the file is complete and before it takes ``path``'s place (:class:`OutputFolder` records it
    there).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, new_file_mode())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_folder(folder)


def text_writer(text: str) -> Callable[[str], None]:
    """The ``write(tmp)`` function that writes ``text`` (UTF-8), for :func:`atomic_save` and friends."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write


def write_text(path: str | os.PathLike, text: str, **kwargs: Any) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    atomic_save(path, text_writer(text), **kwargs)


def json_text(data: Any) -> str:
    """The one JSON spelling of every file we write: indented, sorted keys, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json(path: str | os.PathLike, data: Any, **kwargs: Any) -> None:
    """Atomically write ``data`` as JSON (:func:`json_text`)."""
    write_text(path, json_text(data), **kwargs)


def replace_folder(directory: str | os.PathLike, fill: Callable[[str], None], *,
                   before_rename: Callable[[str], None] | None = None) -> None:
    """``fill(staging)`` writes a complete folder, which then takes ``directory``'s place.

    A folder already at ``directory`` is moved aside first and removed only once the new one is in
    place; an interruption leaves either the old folder (perhaps under its aside name, with the
    staging folder beside it) or the new one, never a half-written folder under ``directory``. Every
    file in the new folder is flushed to disk before it counts.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=parent)
    aside = None
    try:
        fill(staging)
        for root, _, names in os.walk(staging):
            for name in names:
                _fsync_file(os.path.join(root, name))
            fsync_folder(root)
        os.chmod(staging, new_folder_mode())  # mkdtemp makes it 0700
        if before_rename is not None:
            before_rename(staging)
        if os.path.lexists(directory):
            aside = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
            os.rmdir(aside)
            os.replace(directory, aside)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_folder(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staging_folder(inside: str) -> Iterator[str]:
    """A temporary folder inside ``inside`` (same file system, so its files can be renamed into place);
    removed with whatever is left in it."""
    folder = tempfile.mkdtemp(prefix=".staging-", dir=inside)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_writable_folder(path: str | os.PathLike, what: str = "output folder") -> str:
    """Raise :class:`OSError` (one line, naming ``what``) unless ``path`` is, or can be made, a folder we
    can write in. Nothing is created: the nearest existing folder on the path is probed with a
    temporary file, which is removed at once. Returns the absolute path."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputConflict(f"{what} is empty: give a folder name", ours=False)
    target = os.path.abspath(os.path.expanduser(text))
    existing = target
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        blocker = "exists and is not a folder" if existing == target else f"cannot be made: {existing} is not a folder"
        raise OutputConflict(f"{what} {text} {blocker}", ours=False)
    try:
        fd, probe = tempfile.mkstemp(prefix=".seggpt-jax-probe-", dir=existing)
    except OSError as e:
        where = "" if existing == target else f" (it would be made in {existing})"
        raise OutputConflict(f"{what} {text} is not writable{where}: {e.strerror or e}", ours=False) from None
    os.close(fd)
    os.remove(probe)
    return target


class OutputConflict(OSError):
    """A file the tool would write exists: not written by it (or changed since), or written by an earlier
    run while replacing is off (``ours``)."""

    def __init__(self, message: str, *, ours: bool):
        super().__init__(message)
        self.ours = ours

    def __str__(self) -> str:
        return self.args[0]


@dataclasses.dataclass(frozen=True)
class Record:
    """One line of an output folder's record."""

    name: str
    kind: str  # "file" or "folder"
    size: int | None  # files
    mtime_ns: int | None  # files
    inode: int | None
    job: str | None = None
    source: tuple | None = None  # (path, size, mtime_ns) of the input it came from

    def matches(self, path: str) -> bool:
        """Whether ``path`` is still exactly what this record describes."""
        try:
            info = os.lstat(path)
        except OSError:
            return False
        if self.kind == "folder":
            return os.path.isdir(path) and info.st_ino == self.inode
        if not os.path.isfile(path):
            return False
        return (info.st_size, info.st_mtime_ns) == (self.size, self.mtime_ns) and \
            (self.inode is None or info.st_ino == self.inode)

    def line(self) -> bytes:
        entry: dict[str, Any] = {"name": self.name}
        if self.kind == "folder":
            entry.update(kind="folder", inode=self.inode)
        else:
            entry.update(size=self.size, mtime_ns=self.mtime_ns, inode=self.inode)
        if self.job is not None:
            entry["job"] = self.job
        if self.source is not None:
            entry["source"] = list(self.source)
        return (json.dumps(entry, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, line: str) -> "Record | None":
        try:
            entry = json.loads(line)
            kind = entry.get("kind", "file")
            source = entry.get("source")
            return cls(name=str(entry["name"]), kind=kind,
                       size=int(entry["size"]) if kind == "file" else None,
                       mtime_ns=int(entry["mtime_ns"]) if kind == "file" else None,
                       inode=int(entry["inode"]) if entry.get("inode") is not None else None,
                       job=entry.get("job"), source=tuple(source) if source is not None else None)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # a line cut short by a crash: whatever it named counts as not ours


def manifest_name(writer: str | None = None) -> str:
    """The record file of one writer (``None``: the default one)."""
    if writer is None:
        return MANIFEST
    if not writer or os.sep in writer or writer.startswith(".") or not writer.isprintable():
        raise ValueError(f"a record writer's name must be a plain file-name part, got {writer!r}")
    return MANIFEST[:-len(".jsonl")] + f".{writer}.jsonl"


def _manifests(folder: str) -> list[str]:
    """Every record file of a folder: the default one, then the writers' (by name)."""
    base = MANIFEST[:-len(".jsonl")]
    others = sorted(glob.glob(os.path.join(glob.escape(folder), base + ".*.jsonl")))
    return [os.path.join(folder, MANIFEST)] + others


def _read_manifest(folder: str) -> dict[str, list[Record]]:
    records: dict[str, list[Record]] = {}
    for path in _manifests(folder):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    record = Record.parse(line)
                    if record is not None:
                        records.setdefault(record.name, []).append(record)
        except (FileNotFoundError, NotADirectoryError):
            pass
    return records


def _current(records: list[Record] | None, path: str) -> Record | None:
    """The record that describes ``path`` as it is now (the newest that matches), if any."""
    for record in reversed(records or ()):
        if record.matches(path):
            return record
    return None


def stops_every_write(error: BaseException) -> bool:
    """A file-system error that will hit every later output too (disk full, quota, read-only, no
    permission): a run stops on it, where any other error fails only the input at hand."""
    import errno

    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES,
                                                          errno.EPERM)


def written_by_us(path: str | os.PathLike, _cache: dict | None = None) -> bool:
    """Whether ``path`` is a file this tool wrote (recorded in its folder's record, unchanged since)."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    records = _cache.setdefault(folder, _read_manifest(folder)) if _cache is not None else _read_manifest(folder)
    return _current(records.get(name), path) is not None


def file_stamp(path: str | os.PathLike) -> tuple[str, int, int]:
    """``(path, size, mtime_ns)`` of an input: what :class:`OutputFolder` remembers as an output's source."""
    info = os.stat(path)
    return os.fspath(path), info.st_size, info.st_mtime_ns


class OutputFolder:
    """A folder the tool writes into, which remembers the files and folders it wrote.

    Args:
        path: the folder (created by the first write).
        overwrite: whether outputs this tool wrote earlier may be replaced. Files and folders it did
            not write (or that were changed since) are never replaced nor deleted, whatever this says.
        job: a fingerprint of what produces the outputs (model, prompts, options). Outputs recorded
            with another job, or from an input that changed since, are :data:`STALE`: replaced only
            with ``overwrite``, never taken as done.
        writer: this process's own record file (``.seggpt-jax-outputs.<writer>.jsonl``) when several
            processes write the folder at once; ``None``: the default record file. All are read.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, job: str | None = None,
                 writer: str | None = None):
        self.path = os.fspath(path)
        self.manifest = manifest_name(writer)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise OutputConflict(f"output folder {self.path} exists and is not a folder", ours=False)
        self.overwrite, self.job = overwrite, job
        self._records = _read_manifest(self.path)
        self._lock = threading.Lock()

    def create(self) -> str:
        """Make the folder (mode from the umask); called by the first write, so a run that fails before
        writing anything leaves nothing behind."""
        os.makedirs(self.path, exist_ok=True)
        return self.path

    def target(self, name: str) -> str:
        return os.path.join(self.path, name)

    def record(self, name: str) -> Record | None:
        """The record of ``name`` as it is now on disk, if the tool wrote it (and it is unchanged)."""
        return _current(self._records.get(name), self.target(name))

    def owns(self, name: str) -> bool:
        return self.record(name) is not None

    def status(self, name: str, source: tuple | None = None) -> str:
        """:data:`ABSENT`, :data:`OURS`, :data:`STALE` or :data:`FOREIGN` (see the module doc)."""
        target = self.target(name)
        if not os.path.lexists(target):
            return ABSENT
        record = self.record(name)
        if record is None:
            return FOREIGN
        if self.job is not None and record.job != self.job:
            return STALE
        if source is not None and record.source != tuple(source):
            return STALE
        return OURS

    def check(self, name: str, source: tuple | None = None) -> str:
        """The target path, if ``name`` may be written; else :class:`OutputConflict` saying why."""
        state = self.status(name, source)
        target = self.target(name)
        if state == FOREIGN:
            raise OutputConflict(f"{target} exists and was not written by seggpt-jax (or was changed since); "
                                 f"it is left alone: choose another output location or move it away", ours=False)
        if state == STALE and not self.overwrite:
            raise OutputConflict(f"{target} exists from an earlier run with other settings or inputs; pass "
                                 f"--overwrite to replace it", ours=True)
        if state == OURS and not self.overwrite:
            raise OutputConflict(f"{target} exists (written by an earlier run); pass --overwrite to replace it",
                                 ours=True)
        return target

    def write(self, name: str, write: Callable[[str], None], *, source: tuple | None = None,
              replace: bool = False) -> str:
        """Atomically write ``name`` with ``write(tmp_path)``, recorded before it appears; returns the path.

        ``replace=True`` replaces an output of ours without ``overwrite`` (a log the same run appends to,
        a run's ``latest`` pointer); someone else's file is still never replaced.
        """
        if replace and self.status(name, source) != FOREIGN:
            target = self.target(name)
        else:
            target = self.check(name, source)
        self.create()
        atomic_save(target, write, before_rename=lambda tmp: self._append(Record(
            name, "file", *_file_stamp(tmp), job=self.job, source=tuple(source) if source is not None else None)))
        return target

    def write_json(self, name: str, data: Any, **kwargs: Any) -> str:
        return self.write(name, text_writer(json_text(data)), **kwargs)

    def write_folder(self, name: str, fill: Callable[[str], None], *, replace: bool = False) -> str:
        """A whole folder ``name`` filled by ``fill(staging)``, swapped in complete (:func:`replace_folder`)."""
        if replace and self.status(name) != FOREIGN:
            target = self.target(name)
        else:
            target = self.check(name)
        self.create()
        replace_folder(target, fill, before_rename=lambda staging: self._append(
            Record(name, "folder", None, None, os.lstat(staging).st_ino, job=self.job)))
        return target

    def adopt(self, name: str, source_file: str, *, source: tuple | None = None, replace: bool = False) -> str:
        """Move a finished file (on the same file system, e.g. from :func:`staging_folder`) in as ``name``
        (``replace``: as in :meth:`write`)."""
        target = self.target(name) if replace and self.status(name, source) != FOREIGN else self.check(name, source)
        os.chmod(source_file, new_file_mode())
        _fsync_file(source_file)
        self._append(Record(name, "file", *_file_stamp(source_file), job=self.job,
                            source=tuple(source) if source is not None else None))
        os.replace(source_file, target)
        fsync_folder(self.path)
        return target

    def remove(self, name: str) -> bool:
        """Delete ``name`` if (and only if) this tool wrote it and it is unchanged; a folder is first
        renamed aside, so an interruption never leaves it half deleted under its own name. Returns
        whether anything was removed."""
        record = self.record(name)
        if record is None:
            return False
        target = self.target(name)
        if record.kind == "folder":
            aside = tempfile.mkdtemp(prefix=f".{name}.removing-", dir=self.path)
            os.rmdir(aside)
            os.replace(target, aside)
            fsync_folder(self.path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.remove(target)
            fsync_folder(self.path)
        return True

    def names(self, kind: str | None = None) -> list[str]:
        """Names of the outputs that exist and are the tool's (of ``kind`` ``"file"``/``"folder"``)."""
        return sorted(n for n in self._records
                      if (r := self.record(n)) is not None and (kind is None or r.kind == kind))

    def _append(self, record: Record) -> None:
        """Add ``record`` to the folder's record and flush it to disk (one ``write``, so that concurrent
        writers never interleave within a line)."""
        with self._lock:
            self.create()
            manifest = os.path.join(self.path, self.manifest)
            fd = os.open(manifest, os.O_RDWR | os.O_CREAT | os.O_APPEND, new_file_mode())
            try:
                data = record.line()
                end = os.lseek(fd, 0, os.SEEK_END)
                if end and os.pread(fd, 1, end - 1) != b"\n":
                    data = b"\n" + data  # a line cut short by a crash stays a line of its own
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._records.setdefault(record.name, []).append(record)


def _file_stamp(path: str) -> tuple[int, int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns, info.st_ino
