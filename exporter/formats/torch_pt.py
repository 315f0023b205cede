"""torch files (.pt/.pth/.bin): a zip with ``*/data.pkl``, or a legacy protocol-2+ pickle.

Read only through ``torch.load(weights_only=True, map_location="cpu")``: the safe loader
refuses any pickle that is not plain tensors and containers, so nothing in a user's file
can run code.  Nested checkpoints (``{"state_dict": {...}, "epoch": 3}``) are flattened
with ``"/"`` joins; leaves that are not tensors are skipped.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from exporter import atomic
from exporter.deps import require
from exporter.errors import StateFileError
from exporter.formats import _common as C

NAME = "torch"
DTYPES = C.COMMON | {"bfloat16", "complex128"}
SUFFIXES = (".pt", ".pth", ".bin")


def _looks_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def sniff(src: C.Source) -> bool:
    if src.is_dir:
        return False
    if src.is_zip():
        return any(PurePosixPath(n).name == "data.pkl" and n.count("/") <= 1 for n in src.zip_names())
    return _looks_pickle(src.head)


def _detail(e: Exception) -> str:
    paras = [s.strip() for s in str(e).split("\n\n") if s.strip()]
    keep = [s for s in paras if not s.startswith(("Weights only load failed", "Check the documentation"))]
    return " ".join(keep or paras[:1]).replace("\n", " ")


def read(src: C.Source, *, digest: bool) -> C.Read:
    p = src.path
    torch = require("torch", f"reading {p} (a torch file)")

    def parse() -> tuple[dict[str, np.ndarray], dict[str, str]]:
        try:
            # A file object, not the path: torch.load hands any path ending in .safetensors to
            # safetensors, and we decide formats from bytes, not names.
            with src.stream() as fh, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(fh, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise StateFileError(
                f"{p}: refused to load: torch's safe loader (weights_only=True) rejects its pickle ({_detail(e)}). "
                "exporter never unpickles anything else, because unpickling arbitrary objects can run code. If you "
                "trust the file, re-save only the weights (torch.save(model.state_dict(), path)) or convert them to "
                ".safetensors; if it is truncated, re-download it"
            ) from e
        except StateFileError:
            raise
        except Exception as e:  # zip/storage errors on untrusted bytes
            raise StateFileError(
                f"{p}: not a readable torch file ({type(e).__name__}: {_detail(e)}); it is corrupt or truncated: {C.RESAVE}"
            ) from e

        def leaf(x: Any) -> np.ndarray | str | None:
            if isinstance(x, torch.Tensor):
                return C.torch_to_numpy(x)
            if isinstance(x, np.ndarray):
                return x
            return None  # ints, floats, strings, None: not tensors

        out: dict[str, np.ndarray] = {}
        problems: list[str] = []
        C.flatten_tree(obj, "", out, problems, leaf)
        if problems:
            raise StateFileError.listing(f"{p}: holds tensors exporter cannot convert to numpy; cast them and re-save", problems)
        return out, {}

    return C.hashed(src, digest, parse)


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    got = read(C.Source.probe(path), digest=False)  # streams the file: no copy of it in memory
    return C.checked(got.path, got.arrays), got.metadata


def check_save(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None) -> list[str]:
    return C.file_target(path) + C.no_metadata(NAME, metadata)


def save(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    torch = require("torch", f"writing {path} as a torch file")
    tensors = {k: C.numpy_to_torch(v, torch) for k, v in arrays.items()}
    with atomic.atomic_write(path) as fh:
        torch.save(tensors, fh)
