"""A huggingface_hub cache laid out by hand, so that Hub repo ids resolve offline in tests and examples."""

from __future__ import annotations

import hashlib
import os
import shutil

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(cache: str, repo_id: str, files: dict[str, str]) -> None:
    """Lay files out the way huggingface_hub caches a download: blobs, a snapshot of links, refs/main."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(snapshot, exist_ok=True)
    for name, source in files.items():
        with open(source, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        shutil.copy(source, os.path.join(repo, "blobs", digest))
        os.symlink(os.path.join("..", "..", "blobs", digest), os.path.join(snapshot, name))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)
