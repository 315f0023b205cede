"""A single ``.npy`` array (``\\x93NUMPY`` magic), loaded under the key ``"array"``.

Read with ``allow_pickle=False`` after checking the header: object arrays are refused
(they need pickle) and the payload must be exactly shape x itemsize bytes.  Written only
by :func:`exporter.state.save_arrays` (one array is not named state), hence no ``save``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from exporter import atomic
from exporter.errors import StateFileError
from exporter.formats import _common as C

NAME = "npy"
DTYPES = C.COMMON | {"complex128"}
SUFFIXES = (".npy",)


def sniff(src: C.Source) -> bool:
    return not src.is_dir and src.head.startswith(b"\x93NUMPY")


def check_header(f: Any, total: int, p: Path, entry: str | None) -> None:
    """Validate an .npy header and that the payload size matches it (catches truncation and bombs)."""
    from numpy.lib import format as npf

    where = f"{p}" + (f" (entry {entry!r})" if entry else "")
    try:
        version = npf.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = npf.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _fortran, dtype = npf.read_array_header_2_0(f)
        else:  # version 3 headers only differ in encoding; np.load still checks the payload
            return
        header_len = f.tell()
    except Exception as e:  # untrusted header
        raise StateFileError(f"{where}: invalid .npy header ({e}); {C.RESAVE}") from e
    if dtype.hasobject:
        raise StateFileError(
            f"{where}: holds a Python-object array, which can only be read with pickle; exporter never unpickles. "
            "Save numeric arrays instead (np.save(path, arr.astype(np.float32)))"
        )
    expected = math.prod(shape) * dtype.itemsize
    if total - header_len != expected:
        raise StateFileError(
            f"{where}: header declares {dtype} {tuple(shape)} = {expected:,} bytes but {total - header_len:,} bytes follow; "
            f"the file is truncated or corrupt: {C.RESAVE}"
        )


def read(src: C.Source, *, digest: bool) -> C.Read:
    p = src.path

    def parse() -> tuple[dict[str, np.ndarray], dict[str, str]]:
        with src.stream() as f:
            check_header(f, src.size, p, None)
            f.seek(0)
            try:
                arr = np.load(f, allow_pickle=False)
            except Exception as e:  # untrusted bytes
                raise StateFileError(f"{p}: not a readable .npy file ({e}); {C.RESAVE}") from e
        return {"array": arr}, {C.CONTAINER_KEY: "array"}

    return C.hashed(src, digest, parse)


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    got = read(C.Source.probe(path), digest=False)
    return C.checked(got.path, got.arrays), got.metadata


def save_array(arr: np.ndarray, path: Path) -> None:
    """Write one array (what :func:`exporter.state.save_arrays` does for ``.npy``)."""
    from numpy.lib import format as npf

    with atomic.atomic_write(path) as fh:
        npf.write_array(fh, arr, allow_pickle=False)
