"""orbax checkpoint directories (``_METADATA`` / ``_CHECKPOINT_METADATA`` / ``manifest.ocdbt``).

Accepts an item directory, a step directory holding item subdirectories, or a
CheckpointManager root (numeric step subdirectories: the newest step is read).  orbax
(tensorstore) reads its own files, so a hashed read costs two passes over the bytes: orbax's
and :func:`exporter.hashing.sha256_tree` over the directory given.  orbax stores no
zero-size arrays and no empty state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from exporter import atomic, sharded
from exporter.deps import require
from exporter.errors import StateFileError
from exporter.formats import _common as C
from exporter.hashing import sha256_tree

NAME = "orbax"
DTYPES = C.COMMON | {"bfloat16", "complex128"}
SUFFIXES = (".orbax",)
_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")


def items(d: Path) -> list[tuple[str, Path]]:
    """(key prefix, item directory) pairs of an orbax checkpoint at ``d``; [] when it is not one.

    Keys get an ``"<item>/"`` prefix when a step directory holds several items.
    """
    if (d / "_METADATA").is_file() or (d / "manifest.ocdbt").is_file():
        return [("", d)]
    subdirs = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
    found = [(c.name, c) for c in subdirs if (c / "_METADATA").is_file()]
    if len(found) == 1:  # the usual single "default"/"state" item: no key prefix
        return [("", found[0][1])]
    if found:
        return found
    steps = [c for c in subdirs if c.name.isdigit() and any((c / m).exists() for m in _MARKERS)]
    if steps:
        return items(max(steps, key=lambda c: int(c.name)))
    return []


def sniff(src: C.Source) -> bool:
    return src.is_dir and bool(items(src.path))


def read(src: C.Source, *, digest: bool) -> C.Read:
    p = src.path
    out: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for prefix, item in items(p):
        C.flatten_tree(sharded.read_orbax(item), prefix, out, problems, C.array_leaf)
    if problems:
        raise StateFileError.listing(f"{p}: inconsistent orbax tree", problems)
    if not digest:
        return C.Read(p, out, {}, "")
    try:
        sha = sha256_tree(p)
    except OSError as e:
        raise StateFileError(f"{p}: cannot be read for hashing ({e}); check its permissions") from e
    return C.Read(p, out, {}, sha)


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    got = read(C.Source.probe(path), digest=False)
    return C.checked(got.path, got.arrays), got.metadata


def check_save(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None) -> list[str]:
    problems = C.no_metadata(NAME, metadata)
    problems += [f"tensor {k!r}: orbax cannot store zero-size arrays (shape {a.shape})" for k, a in arrays.items() if a.size == 0]
    C.unflatten(arrays, problems)
    if not arrays:
        problems.append("orbax cannot store an empty state")
    seen: dict[str, str] = {}
    for k in sorted(arrays):
        dotted = k.replace("/", ".")  # orbax names its arrays by the dotted tree path
        if dotted in seen:
            problems.append(f"tensor {k!r}: orbax would store it under the same name as {seen[dotted]!r}")
        seen[dotted] = k
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or items(path))):
        problems.append(f"{path}: exists and is not an orbax checkpoint; refusing to replace it. Choose a new directory")
    return problems


def save(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    ocp = require("orbax.checkpoint", f"writing {path} as an orbax checkpoint")
    problems: list[str] = []
    tree = C.unflatten(arrays, problems)
    assert not problems, problems  # checked in check_save
    with atomic.atomic_dir(path) as tmp:
        # orbax insists on creating its directory (and its own temp name beside it): give it one
        # inside our temp dir, so a failure leaves nothing behind, then lift its contents up.
        inner = (tmp / "orbax").resolve()
        ckptr = ocp.StandardCheckpointer()
        try:
            ckptr.save(inner, tree)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        for entry in inner.iterdir():
            os.replace(entry, tmp / entry.name)
        inner.rmdir()
