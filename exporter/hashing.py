"""Content hashes: one place for every sha256 that exporter records.

Bundles, state files and training checkpoints all hash through here, so a file hashed by
one is hashed identically by the others.  sha256 is used for provenance (users compare
it with ``sha256sum`` and with other tools' manifests).  Training checkpoints (format 3)
use BLAKE3 instead (:func:`new_hash`, :func:`blake3_bytes`, :func:`blake3_file`): a
cryptographic hash several times faster than sha256, so integrity checks keep up with the
disk (``b3sum`` computes the same digests); older checkpoints name sha256.

A directory hashes, in sorted order of relative POSIX path, one line
``"<relative path>\\0<file sha256>\\n"`` per regular file (symlinked directories are not
followed).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "CHUNK",
    "HASHES",
    "sha256_bytes",
    "sha256_file",
    "sha256_tree",
    "sha256_entries",
    "sha256_path",
    "new_hash",
    "hash_bytes",
    "blake3_bytes",
    "blake3_file",
]

CHUNK = 1 << 20
#: Algorithms :func:`new_hash` knows (what a manifest may name).
HASHES = ("sha256", "blake3")


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_entries(entries: Iterable[tuple[str, str]]) -> str:
    """Hex sha256 over ``(relative path, file sha256)`` pairs, in the order given."""
    h = hashlib.sha256()
    for rel, digest in entries:
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def sha256_tree(root: str | os.PathLike[str]) -> str:
    """Hex sha256 of a directory tree (see the module docstring)."""
    base = Path(root)
    files = []
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            f = Path(dirpath) / name
            files.append((f.relative_to(base).as_posix(), f))
    return sha256_entries((rel, sha256_file(f)) for rel, f in sorted(files))


def sha256_path(path: str | os.PathLike[str]) -> str:
    """:func:`sha256_tree` for a directory, :func:`sha256_file` for a file."""
    return sha256_tree(path) if Path(path).is_dir() else sha256_file(path)


def new_hash(algorithm: str) -> Any:
    """A fresh hasher (``update(data)``, ``hexdigest()``) for one of :data:`HASHES`.

    Both release the GIL while hashing large buffers, so hashing on a worker thread
    overlaps with I/O on another.
    """
    if algorithm == "blake3":
        from blake3 import blake3  # a core dependency; imported here to keep `import exporter` light

        return blake3()
    assert algorithm == "sha256", algorithm
    return hashlib.sha256()


def hash_bytes(algorithm: str, data: bytes | bytearray | memoryview) -> str:
    """Hex digest of ``data`` with one of :data:`HASHES`."""
    h = new_hash(algorithm)
    h.update(data)
    return str(h.hexdigest())


def blake3_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex BLAKE3 (32 bytes) of ``data``."""
    return hash_bytes("blake3", data)


def blake3_file(path: str | os.PathLike[str]) -> str:
    """Hex BLAKE3 of a file's bytes (read into one reused 8 MiB buffer), as ``b3sum`` prints it."""
    h = new_hash("blake3")
    buf = bytearray(8 * CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return str(h.hexdigest())
