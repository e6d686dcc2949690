"""Writing and hashing files safely: the one place that knows how.

`atomic_write` replaces a file so that a reader, a crash or a full disk leaves the old file or the
new one whole, never a mix: the bytes go to a temporary file beside it (same filesystem), are
fsynced, renamed over the target, and the directory entry is fsynced too. Journals, configs,
manifests, tokenizers and token indexes all go through it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH_BLOCK = 1 << 20  # read a hashed file a MiB at a time


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` whole (see the module docstring); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden and unique per process: two writers never share a temporary, and folder listings
    # (the session manifest) skip it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of `text` as UTF-8."""
    atomic_write(path, text.encode("utf-8"))


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (a no-op on Windows, which cannot)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex, read in blocks (token files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()
