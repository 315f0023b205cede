"""safetensors: u64 little-endian header length N, N bytes of JSON, then the raw tensor bytes.

The header is parsed and checked here, with the reference implementation's rules (header
at most 100,000,000 bytes and inside the file, UTF-8 JSON object, known dtypes, offsets
that tile the data section from 0 without gaps or overlaps, sizes equal to shape x dtype,
no trailing bytes) plus one it lacks: duplicate JSON keys are refused, because readers
disagree on which entry wins (Python's json keeps the last) and two of them could load
different tensors from the same file.  Parsing the header ourselves is what lets a loaded
file be read once: the tensors are views into the one buffer that was also hashed.
Writing goes through ``safetensors.numpy.save``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from exporter import atomic
from exporter.errors import StateFileError
from exporter.formats import _common as C
from exporter.hashing import sha256_file

NAME = "safetensors"
DTYPES = C.COMMON | {"bfloat16"}
SUFFIXES = (".safetensors",)
MAX_HEADER = 100_000_000  # the reference implementation's limit

# safetensors dtype code -> (numpy dtype name, or None when exporter cannot read it; bits per element)
_CODES: dict[str, tuple[str | None, int]] = {
    "BOOL": ("bool", 8),
    "U8": ("uint8", 8),
    "I8": ("int8", 8),
    "U16": ("uint16", 16),
    "I16": ("int16", 16),
    "F16": ("float16", 16),
    "BF16": ("bfloat16", 16),
    "U32": ("uint32", 32),
    "I32": ("int32", 32),
    "F32": ("float32", 32),
    "U64": ("uint64", 64),
    "I64": ("int64", 64),
    "F64": ("float64", 64),
    "C64": ("complex64", 64),
    "F4": (None, 4),
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
    "F8_E5M2": (None, 8),
    "F8_E4M3": (None, 8),
    "F8_E8M0": (None, 8),
    "F8_E4M3FNUZ": (None, 8),
    "F8_E5M2FNUZ": (None, 8),
}


class Entry(NamedTuple):
    name: str
    code: str  # the safetensors dtype code
    dtype: str | None  # numpy dtype name; None when exporter cannot read it
    shape: tuple[int, ...]
    begin: int  # offset in the data section
    end: int


def sniff(src: C.Source) -> bool:
    # u64 little-endian header length (high bytes zero for any real file), then the JSON "{".
    # (A zip never matches: its byte 8 is a compression method, and 0x7b is none.)
    head = src.head
    return not src.is_dir and len(head) >= 9 and head[8:9] == b"{" and head[5:8] == b"\0\0\0"


# ----------------------------------------------------------------------------- header
def _bad(p: Path, problem: str) -> StateFileError:
    return StateFileError(f"{p}: {problem}; the file is corrupt or truncated: {C.RESAVE}")


def header_length(p: Path, head: bytes, size: int) -> int:
    """N from the first 8 bytes, checked against the format's limit and the file size."""
    if len(head) < 8:
        raise StateFileError(f"{p}: {size} bytes is too short for a safetensors header (truncated); {C.RESAVE}")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER:
        raise StateFileError(
            f"{p}: safetensors header length {n:,} is larger than the format's limit of {MAX_HEADER:,} bytes; "
            f"the file is corrupt or not safetensors: {C.RESAVE}"
        )
    if 8 + n > size:
        raise StateFileError(
            f"{p}: safetensors header ({n:,} bytes) runs past the end of the file ({size:,} bytes); "
            f"the file is truncated: {C.RESAVE}"
        )
    return n


def parse_header(p: Path, raw: bytes, data_len: int) -> tuple[list[Entry], dict[str, str]]:
    """Check a header (``raw``: its N bytes) against a data section of ``data_len`` bytes.

    Returns the tensors in name order and the ``__metadata__``.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(p, f"header is not valid UTF-8 ({e})") from e
    dups: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in items:
            if k in seen:
                dups.append(f"key {k!r}: appears more than once")
            seen[k] = v
        return seen

    try:
        doc = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise _bad(p, f"header is not valid JSON ({e})") from e
    if dups:
        raise StateFileError.listing(
            f"{p}: safetensors header has duplicate JSON keys; readers disagree on which entry wins (Python keeps "
            f"the last), so two of them could load different tensors from this file. Refusing it: {C.RESAVE}",
            dups,
        )
    if not isinstance(doc, dict):
        raise _bad(p, f"header is a JSON {type(doc).__name__}, not an object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(p, "header '__metadata__' must map strings to strings")
    entries = [_entry(p, name, info) for name, info in doc.items()]
    end = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != end:
            raise _bad(
                p,
                f"overlapping or out-of-range data_offsets (tensors must tile the data section from 0 without gaps): "
                f"tensor {e.name!r} starts at {e.begin}, expected {end}",
            )
        end = e.end
    if end != data_len:
        raise _bad(
            p,
            f"data section does not match the header (truncated file, out-of-range data_offsets or trailing bytes): "
            f"the header covers {end:,} bytes, the file holds {data_len:,}",
        )
    unreadable = [f"tensor {e.name!r}: dtype {e.code}" for e in entries if e.dtype is None]
    if unreadable:
        raise StateFileError.listing(
            f"{p}: holds tensors with dtypes exporter cannot read (supported: {', '.join(sorted(DTYPES))}); "
            "cast them (e.g. to float32) and re-save",
            unreadable,
        )
    return sorted(entries), dict(meta)


def _entry(p: Path, name: str, info: Any) -> Entry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _bad(p, f"tensor {name!r}: header entry must be an object with dtype, shape and data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in _CODES:
        raise _bad(p, f"unknown dtype in the header: tensor {name!r} has dtype {code!r} (known: {', '.join(_CODES)})")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise _bad(p, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise _bad(p, f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    dtype, bits = _CODES[code]
    nbits = math.prod(shape) * bits
    if nbits % 8 or offsets[1] - offsets[0] != nbits // 8:
        raise _bad(
            p,
            f"a tensor's byte range does not equal its shape x dtype size: tensor {name!r} is {code}{shape} "
            f"({nbits / 8:g} bytes) but data_offsets {offsets} span {offsets[1] - offsets[0]} bytes",
        )
    return Entry(name, code, dtype, tuple(shape), offsets[0], offsets[1])


# ----------------------------------------------------------------------------- read / describe
def _arrays(buf: np.ndarray, start: int, entries: list[Entry]) -> dict[str, np.ndarray]:
    """Views of ``buf`` (the whole file) for each tensor; a misaligned one is copied to align it."""
    out: dict[str, np.ndarray] = {}
    for e in entries:
        assert e.dtype is not None, e  # parse_header refuses unreadable dtypes
        dtype = C.bfloat16() if e.dtype == "bfloat16" else np.dtype(e.dtype).newbyteorder("<")
        chunk = buf[start + e.begin : start + e.end]
        if (start + e.begin) % dtype.itemsize:
            chunk = chunk.copy()
        out[e.name] = C.native(chunk.view(dtype).reshape(e.shape))
    return out


def read(src: C.Source, *, digest: bool) -> C.Read:
    """The whole file into one buffer (read once); tensors are views of it, in name order."""
    buf = src.data()

    def parse() -> tuple[dict[str, np.ndarray], dict[str, str]]:
        n = header_length(src.path, bytes(buf[:8]), len(buf))
        entries, meta = parse_header(src.path, bytes(buf[8 : 8 + n]), len(buf) - 8 - n)
        return _arrays(buf, 8 + n, entries), meta

    return C.hashed(src, digest, parse)


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    got = read(C.Source.load(path), digest=False)
    return C.checked(got.path, got.arrays), got.metadata


def describe(path: Path) -> C.StateInfo:
    """From the header alone: two opens (the header, then the file streams through the hash)."""
    p = C.existing(path)
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            n = header_length(p, head, size)
            raw = fh.read(n)
        entries, meta = parse_header(p, raw, size - 8 - n)
        digest = sha256_file(p)
    except OSError as e:
        raise StateFileError(f"{p}: cannot be read ({e}); check its permissions") from e
    infos = [C.TensorInfo(e.name, str(e.dtype), e.shape, e.end - e.begin) for e in entries]
    return C.state_info(p, NAME, infos, digest, meta)


# ----------------------------------------------------------------------------- write
def check_save(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None) -> list[str]:
    problems = C.file_target(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        problems.append("metadata must map str to str")
    return problems


def save(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    from safetensors import numpy as st_numpy

    # safetensors.numpy.save builds the file in memory; write_bytes then makes it durable atomically.
    data = st_numpy.save(dict(arrays), metadata=dict(metadata) if metadata else None)
    atomic.write_bytes(path, data)
