"""Resolve what ``from_pretrained`` was given into a config file and weight files.

Accepted: a local directory (transformers layout or ours), a single weight file (an original BAAI
``.pth``, a ``pytorch_model.bin``, a ``.safetensors``, or a sharded ``*.index.json``), or a Hugging Face
Hub repo id fetched with ``huggingface_hub`` (config and weight files only; safetensors preferred).
:func:`resolve_file` finds one other named file the same way (``preprocessor_config.json``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import urllib.parse



class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the problem."""

CONFIG_NAME = "config.json"
#: Weight files looked for in a directory or Hub repo, in order of preference.
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: The original BAAI layout, tried when a repo has no config.json: ``save_pretrained(layout="original")``'s
#: file, then the BAAI release itself (Hub repo ``BAAI/SegGPT``).
ORIGINAL_NAMES = ("seggpt_vit_large.safetensors", "seggpt_vit_large.pth")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".index.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$|^[A-Za-z0-9][\w.\-]*$")


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """The name is neither a local checkpoint nor reachable on the Hub or in its cache.

    ``reason`` is the first sentence alone (the command line adds its own advice)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


@dataclasses.dataclass
class Resolved:
    """Where the config and the weights of a checkpoint are."""

    description: str
    weights: str  # a weight file or an *.index.json
    config_file: str | None  # None: config must come from the caller, the file's metadata, or the ViT-L default


_HOW_TO_PASS_A_PATH = (
    "To load a checkpoint you already have, pass its local path instead, e.g. "
    "SegGptForImageSegmentation.from_pretrained('/path/to/seggpt-vit-large') (a folder with config.json and "
    "model.safetensors or pytorch_model.bin) or from_pretrained('/path/to/seggpt_vit_large.pth') (the original "
    "BAAI file). On a machine with network access, `hf download BAAI/seggpt-vit-large --local-dir DIR` "
    "makes such a folder."
)


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            local_files_only: bool = False, token: str | bool | None = None) -> Resolved:
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(path):
        return _resolve_directory(path)
    if os.path.isfile(path):
        return _resolve_file(path)
    _check_repo_id(path)
    return _resolve_hub(_HubRepo(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                 token=token))


def resolve_file(name_or_path: str | os.PathLike, filename: str, *, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                 token: str | bool | None = None, required: bool = True) -> str | None:
    """The local path of one named file of a checkpoint (``config.json``, ``preprocessor_config.json``).

    ``name_or_path`` is what ``from_pretrained`` takes: a local folder (the file in it), a local file
    (the file beside it), or a Hub repo id (downloaded through the huggingface_hub cache, with the
    offline detection, cache fallback and errors of :func:`resolve`). Returns ``None`` when the file
    does not exist and ``required`` is false; offline, a file missing from a cached snapshot counts as
    absent.

    Raises:
        ModelNotFoundError: a required file is absent, or the repo (or revision) is neither on the Hub
            nor in the cache; the message names the repo or folder and the file.
    """
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(path) or os.path.isfile(path):
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        candidate = os.path.join(folder, filename)
        if os.path.isfile(candidate):
            return candidate
        if required:
            raise ModelNotFoundError(f"{folder}: no {filename} in this folder")
        return None
    _check_repo_id(path)
    return _HubRepo(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                    token=token).download(filename, required=required)


def _check_repo_id(path: str) -> None:
    """Raise for a missing local path or a name that cannot be a Hub repo id."""
    if _looks_like_path(path):
        raise ModelNotFoundError(f"no such file or directory: {path}")
    if not _REPO_ID.match(path):
        raise ModelNotFoundError(
            f"{path!r} is neither an existing local path nor a Hugging Face repo id ('organisation/name'). "
            + _HOW_TO_PASS_A_PATH)


def _looks_like_path(text: str) -> bool:
    """Repo ids are ``name`` or ``org/name``; anything else path-like is reported as a missing path."""
    return (text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
            or text.endswith(_WEIGHT_SUFFIXES))


def _resolve_directory(folder: str) -> Resolved:
    config = os.path.join(folder, CONFIG_NAME)
    for name in WEIGHT_NAMES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            if not os.path.isfile(config):
                raise CheckpointError(f"{folder}: has {name} but no {CONFIG_NAME}; a transformers-layout folder "
                                      f"needs both (or pass the weight file itself together with config=...)")
            return Resolved(folder, candidate, config)
    originals = sorted(f for f in os.listdir(folder) if f.endswith((".pth", ".pt", ".safetensors")))
    if len(originals) == 1:
        return _resolve_file(os.path.join(folder, originals[0]))
    found = sorted(os.listdir(folder))
    raise CheckpointError(
        f"{folder}: no weights found; expected one of {list(WEIGHT_NAMES)} (with {CONFIG_NAME}) or a single "
        f"original .pth or .safetensors file; the folder holds {found[:20]}{' ...' if len(found) > 20 else ''}")


def _resolve_file(path: str) -> Resolved:
    if not path.endswith(_WEIGHT_SUFFIXES):
        if os.path.basename(path) == CONFIG_NAME:
            return _resolve_directory(os.path.dirname(path) or ".")
        raise CheckpointError(f"{path}: unknown weight file type (expected .safetensors, .bin, .pth, .pt, or a "
                              f"sharded .index.json)")
    sibling = os.path.join(os.path.dirname(path), CONFIG_NAME)
    return Resolved(path, path, sibling if os.path.isfile(sibling) else None)


# ------------------------------------------------------------------------------------ the Hub
def _offline_reason(local_files_only: bool) -> str | None:
    if local_files_only:
        return "local_files_only=True was given"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "huggingface_hub is in offline mode"
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if not _reachable(endpoint):
        return f"the Hub ({endpoint}) cannot be reached"
    return None


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """One TCP connect, so an offline machine falls back to the cache at once instead of retrying."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let huggingface_hub try
    url = urllib.parse.urlparse(endpoint)
    host = url.hostname
    if not host:
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class _HubRepo:
    """One repo at one revision: every download of :func:`resolve` and :func:`resolve_file` goes through
    :meth:`download`, which decides once whether to go online and turns huggingface_hub's errors into
    one-line :class:`ModelNotFoundError` messages."""

    def __init__(self, repo_id: str, *, revision: str | None, cache_dir: str | os.PathLike | None,
                 local_files_only: bool, token: str | bool | None):
        from huggingface_hub import constants

        self.repo_id, self.revision, self.token = repo_id, revision, token
        self.cache_dir = os.fspath(cache_dir) if cache_dir else constants.HF_HUB_CACHE
        self.offline = _offline_reason(local_files_only)  # None: online
        self.where = repo_id + (f"@{revision}" if revision else "")

    def not_found(self, what: str) -> ModelNotFoundError:
        reason = f"cannot load {self.where!r}: {what}"
        return ModelNotFoundError(f"{reason}. {_HOW_TO_PASS_A_PATH}", reason)

    def download(self, filename: str, *, required: bool = True) -> str | None:
        """The cached path of ``filename``; ``None`` if the repo has none and it is not ``required``."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)

        try:
            return hf_hub_download(self.repo_id, filename, revision=self.revision, cache_dir=self.cache_dir,
                                   local_files_only=self.offline is not None, token=self.token,
                                   library_name="seggpt-jax")
        except GatedRepoError:
            raise ModelNotFoundError(f"{self.repo_id!r} is gated on the Hub: accept its terms and pass token=...") \
                from None
        except RepositoryNotFoundError:
            raise self.not_found("the repository does not exist on the Hub (or is private: pass token=...)") from None
        except RevisionNotFoundError:
            raise self.not_found(f"revision {self.revision!r} does not exist") from None
        except LocalEntryNotFoundError:  # offline (or the Hub did not answer) and not in the cache
            why = self.offline or "the Hub did not answer"
            if not self._revision_cached():
                raise self.not_found(f"it is not in the Hugging Face cache ({self.cache_dir}) and {why}") from None
            if required:
                raise self.not_found(f"{filename} is not in the Hugging Face cache ({self.cache_dir}) and {why}") \
                    from None
            return None  # a cached snapshot without the file: absent
        except EntryNotFoundError:
            if required:
                raise self.not_found(f"the repository has no {filename}") from None
            return None
        except OSError as e:  # network trouble after the reachability check
            raise self.not_found(f"downloading {filename} failed ({e})") from None

    def _revision_cached(self) -> bool:
        """Whether the cache holds a snapshot of this revision (huggingface_hub's cache layout)."""
        repo = os.path.join(self.cache_dir, "models--" + self.repo_id.replace("/", "--"))
        commit = self.revision or "main"
        ref = os.path.join(repo, "refs", commit)
        if os.path.isfile(ref):
            with open(ref, encoding="utf-8") as f:
                commit = f.read().strip()
        return os.path.isdir(os.path.join(repo, "snapshots", commit))


def _resolve_hub(hub: _HubRepo) -> Resolved:
    config = hub.download(CONFIG_NAME, required=False)  # None: e.g. BAAI/SegGPT holds only the original .pth
    names = WEIGHT_NAMES if config is not None else ORIGINAL_NAMES
    for name in names:
        weights = hub.download(name, required=False)
        if weights is None:
            continue
        if name.endswith(".index.json"):
            for shard in _shard_names(weights):
                hub.download(shard)
        return Resolved(f"{hub.where} ({os.path.dirname(weights)})", weights, config)
    where = f"in the Hugging Face cache ({hub.cache_dir}; {hub.offline})" if hub.offline else "in the repository"
    raise hub.not_found(f"none of the weight files {list(names)} is {where}")


def _shard_names(index_path: str) -> list[str]:
    import json

    try:
        with open(index_path, encoding="utf-8") as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a valid sharded-checkpoint index: {e}") from None
