"""``.npz``: a zip whose entries are all ``.npy`` files (numpy's ``savez``).

Every entry's header is checked (as :mod:`exporter.formats.npy`) before anything is
loaded, and loading uses ``allow_pickle=False``.  Written as an uncompressed zip, like
``np.savez``, but without its keyword interface (which cannot take keys such as ``file``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from exporter import atomic
from exporter.errors import StateFileError
from exporter.formats import _common as C
from exporter.formats import npy

NAME = "npz"
DTYPES = C.COMMON | {"complex128"}
SUFFIXES = (".npz",)


def sniff(src: C.Source) -> bool:
    return src.is_zip() and all(n.endswith(".npy") for n in src.zip_names())


def read(src: C.Source, *, digest: bool) -> C.Read:
    p = src.path

    def parse() -> tuple[dict[str, np.ndarray], dict[str, str]]:
        out: dict[str, np.ndarray] = {}
        try:
            with src.stream() as fh:
                with zipfile.ZipFile(fh) as zf:
                    for info in zf.infolist():
                        with zf.open(info) as f:
                            npy.check_header(f, info.file_size, p, info.filename)
                fh.seek(0)
                with np.load(fh, allow_pickle=False) as npz:
                    for name in npz.files:
                        out[name] = npz[name]
        except StateFileError:
            raise
        except Exception as e:  # bad CRC, bad header, truncated entry
            raise StateFileError(f"{p}: not a readable .npz file ({type(e).__name__}: {e}); {C.RESAVE}") from e
        meta: dict[str, str] = {}
        if C.NPZ_MARKER in out:
            meta[C.CONTAINER_KEY] = out.pop(C.NPZ_MARKER).tobytes().decode("ascii", "replace")
        return out, meta

    return C.hashed(src, digest, parse)


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    got = read(C.Source.probe(path), digest=False)
    return C.checked(got.path, got.arrays), got.metadata


def check_save(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None) -> list[str]:
    return C.file_target(path) + C.no_metadata(NAME, metadata)


def save(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    from numpy.lib import format as npf

    with atomic.atomic_write(path) as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for k, v in arrays.items():
            with zf.open(k + ".npy", "w", force_zip64=True) as f:
                npf.write_array(f, v, allow_pickle=False)
