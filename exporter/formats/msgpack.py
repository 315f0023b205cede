"""flax msgpack (``flax.serialization.to_bytes`` / ``msgpack_restore``): a msgpack map of arrays.

The tree is flattened with ``"/"`` joins on read; ``"a/b/c"`` keys are nested on write, so
a round trip returns the same flat keys.  msgpack cannot run code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from exporter import atomic
from exporter.deps import require
from exporter.errors import StateFileError
from exporter.formats import _common as C

NAME = "flax-msgpack"
DTYPES = C.COMMON | {"bfloat16", "complex128"}
SUFFIXES = (".msgpack",)


def sniff(src: C.Source) -> bool:
    # a top-level msgpack map: fixmap 0x81..0x8f, map16 0xde, map32 0xdf, or the empty map 0x80 alone
    if src.is_dir or not src.head:
        return False
    b = src.head[0]
    return 0x81 <= b <= 0x8F or b in (0xDE, 0xDF) or (b == 0x80 and src.size == 1)


def read(src: C.Source, *, digest: bool) -> C.Read:
    p = src.path
    serialization = require("flax.serialization", f"reading {p} (a flax msgpack file)")
    data = src.data()

    def parse() -> tuple[dict[str, np.ndarray], dict[str, str]]:
        try:
            tree = serialization.msgpack_restore(memoryview(data))
        except Exception as e:  # msgpack/numpy errors on untrusted bytes
            raise StateFileError(
                f"{p}: not a readable flax msgpack file ({type(e).__name__}: {e}); it is truncated or corrupt: {C.RESAVE}"
            ) from e
        out: dict[str, np.ndarray] = {}
        problems: list[str] = []
        C.flatten_tree(tree, "", out, problems, C.array_leaf)
        if problems:
            raise StateFileError.listing(f"{p}: inconsistent msgpack tree", problems)
        return out, {}

    return C.hashed(src, digest, parse)


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    got = read(C.Source.load(path), digest=False)
    return C.checked(got.path, got.arrays), got.metadata


def check_save(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None) -> list[str]:
    problems = C.file_target(path) + C.no_metadata(NAME, metadata)
    C.unflatten(arrays, problems)
    return problems


def save(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    serialization = require("flax.serialization", f"writing {path} as flax msgpack")
    problems: list[str] = []
    tree = C.unflatten(arrays, problems)
    assert not problems, problems  # checked in check_save
    atomic.write_bytes(path, serialization.msgpack_serialize(tree))
