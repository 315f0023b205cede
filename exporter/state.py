"""Saved state <-> ``dict[str, np.ndarray]``; the format is sniffed from the bytes, never the extension.

Formats (R = read, W = write) and the dtypes each one stores bit-exactly:

    format               R W  how it is recognised             dtypes
    safetensors          R W  u64 header length, then ``{``    common, bfloat16
    torch (.pt/.pth)     R W  zip with ``*/data.pkl``, or a    common, bfloat16, complex128
                              protocol-2+ pickle (legacy)
    npz                  R W  zip whose entries are all .npy   common, complex128
    npy                  R    ``\\x93NUMPY`` magic             common, complex128
    flax-msgpack         R W  msgpack map                      common, bfloat16, complex128
    orbax                R W  directory with _METADATA /       common, bfloat16, complex128
                              _CHECKPOINT_METADATA; also a      (no zero-size arrays, no empty state)
                              CheckpointManager root (newest step)
    hf-sharded           R    model.safetensors.index.json     as its shards (safetensors or torch)
    exporter-checkpoint  R    exporter.checkpoint.is_checkpoint  (delegated to exporter.checkpoint)

``common`` = bool, int8/16/32/64, uint8/16/32/64, float16/32/64, complex64.  float8/float4
and other ml_dtypes types, strings, objects and structured dtypes are refused everywhere
(no format here reads them back consistently; objects would need pickle).

Rules that hold for every format:

* No pickle ever: torch files are read only through ``torch.load(weights_only=True,
  map_location="cpu")``, numpy files with ``allow_pickle=False``; msgpack/orbax/safetensors
  cannot run code.
* ``load_state`` returns a flat dict: nested trees (msgpack, orbax, a torch file holding
  ``{"state_dict": {...}}``) are flattened with ``"/"`` joins; leaves that are not arrays
  (Python ints, strings, None: e.g. an ``epoch`` counter) are skipped.  Arrays come back
  writeable, C-contiguous and in native byte order.
* ``save_state`` accepts a flat or nested mapping of arrays (numpy, torch tensors, jax
  arrays); tree formats (msgpack, orbax) store ``"a/b/c"`` keys as nested dicts, so the
  round trip returns the same flat keys.  Every write is atomic (``exporter.atomic``).
* Every problem with a file a user gives us is a ``StateFileError`` naming the file, what is
  wrong and how to fix it; an impossible request (a dtype a format cannot hold, an unknown
  format name) is a ``UsageError``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from exporter import atomic
from exporter.errors import MissingDependencyError, StateFileError, UsageError, format_problems

__all__ = [
    "FORMATS",
    "WRITE_FORMATS",
    "FORMAT_DTYPES",
    "TensorInfo",
    "StateInfo",
    "sniff",
    "load_state",
    "save_state",
    "inspect_state",
    "sha256_path",
    "save_arrays",
    "load_arrays",
]

FORMATS: tuple[str, ...] = (
    "safetensors",
    "torch",
    "npz",
    "npy",
    "flax-msgpack",
    "orbax",
    "hf-sharded",
    "exporter-checkpoint",
)
WRITE_FORMATS: tuple[str, ...] = ("safetensors", "torch", "npz", "flax-msgpack", "orbax")

_COMMON = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
    + ["float16", "float32", "float64", "complex64"]
)
FORMAT_DTYPES: Mapping[str, frozenset[str]] = {
    "safetensors": _COMMON | {"bfloat16"},
    "torch": _COMMON | {"bfloat16", "complex128"},
    "npz": _COMMON | {"complex128"},
    "npy": _COMMON | {"complex128"},
    "flax-msgpack": _COMMON | {"bfloat16", "complex128"},
    "orbax": _COMMON | {"bfloat16", "complex128"},
    "hf-sharded": _COMMON | {"bfloat16", "complex128"},
}
_ALL_DTYPES = frozenset().union(*FORMAT_DTYPES.values())

_SUFFIX_FORMAT = {
    ".safetensors": "safetensors",
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".npz": "npz",
    ".msgpack": "flax-msgpack",
    ".orbax": "orbax",
}

ST_MAX_HEADER = 100_000_000  # the safetensors reference implementation's limit
_JSON_LIMIT = 100_000_000  # an HF index is kilobytes; refuse to parse anything huge
_CONTAINER_KEY = "exporter.container"  # safetensors metadata written by save_arrays
_NPZ_MARKER = "__exporter_container__"  # the same, as an npz entry (npz has no metadata)
_HF_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
_RESAVE = "re-save it (exporter.state.save_state) or re-download it"


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: name, numpy dtype name, shape and size in bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}


@dataclass(frozen=True)
class StateInfo:
    """What a saved-state file or directory holds (see :func:`inspect_state`)."""

    path: str
    format: str
    tensors: tuple[TensorInfo, ...]
    total_bytes: int
    sha256: str
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "tensors": [t.to_dict() for t in self.tensors],
            "total_bytes": self.total_bytes,
            "sha256": self.sha256,
            "metadata": dict(self.metadata),
        }

    def lines(self) -> list[str]:
        """Readable summary: one header line, then one line per tensor."""
        out = [f"{self.path}: {self.format}, {len(self.tensors)} tensors, {self.total_bytes} bytes, sha256 {self.sha256}"]
        out += [f"  {t.name}  {t.dtype}{list(t.shape)}  {t.nbytes} B" for t in self.tensors]
        return out


# ----------------------------------------------------------------------------- helpers
def _bfloat16() -> np.dtype:
    import ml_dtypes  # a dependency of onnx, so always present; imported late to keep import cheap

    return np.dtype(ml_dtypes.bfloat16)


def _import_torch(purpose: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError(
            f"{purpose} needs torch, which is not installed; install with: pip install 'exporter[torch]'"
        ) from e
    return torch


def _import_jax_module(module: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{purpose} needs {module.split('.')[0]}, which is not installed; install with: pip install 'exporter[jax]'"
        ) from e


def _checkpoint_api() -> Any | None:
    """Helper D's ``exporter.checkpoint`` if it exists and has the two functions we use."""
    try:
        mod = importlib.import_module("exporter.checkpoint")
        mod.is_checkpoint, mod.load_model_state  # noqa: B018 - probe for the API
    except (ImportError, AttributeError):
        return None
    return mod


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise StateFileError(
            f"{path}: no such file or directory; expected a saved state (e.g. model.safetensors, "
            "weights.pt, params.msgpack) or a checkpoint directory. Check the path"
        )
    return p


def _read_head(p: Path, n: int) -> bytes:
    try:
        with open(p, "rb") as fh:
            return fh.read(n)
    except OSError as e:
        raise StateFileError(f"{p}: cannot be read ({e}); check its permissions") from e


def _native(arr: np.ndarray) -> np.ndarray:
    """Native byte order and C-contiguous (copies only when needed)."""
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr if arr.flags.c_contiguous else np.array(arr, order="C")  # (ascontiguousarray makes 0-d 1-d)


def _normalize(arr: np.ndarray) -> np.ndarray:
    """Native byte order, C-contiguous and writeable (copies only when needed)."""
    arr = _native(arr)
    return arr if arr.flags.writeable else arr.copy()


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach") and hasattr(x, "dtype")


def _torch_to_numpy(t: Any) -> np.ndarray | str:
    """A torch tensor as numpy (sharing memory when possible), or a problem string."""
    import torch  # only called with a torch tensor in hand, so torch is importable

    t = t.detach()
    if t.layout != torch.strided or t.is_quantized:
        return f"layout {t.layout}{' (quantized)' if t.is_quantized else ''} is not a dense tensor"
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(_bfloat16())
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        return f"dtype {str(t.dtype).removeprefix('torch.')} is not supported"


def _numpy_to_torch(arr: np.ndarray, torch: Any) -> Any:
    with warnings.catch_warnings():  # read-only arrays: torch only reads them here
        warnings.simplefilter("ignore", UserWarning)
        if arr.dtype == _bfloat16():
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


def _to_numpy(x: Any) -> np.ndarray | str:
    """Convert one user value to a numpy array, or return why it cannot be stored."""
    if isinstance(x, np.ndarray):
        arr = x
    elif isinstance(x, np.generic):
        arr = np.asarray(x)
    elif _is_torch_tensor(x):
        got = _torch_to_numpy(x)
        if isinstance(got, str):
            return got
        arr = got
    elif hasattr(x, "__array__") and not isinstance(x, (str, bytes)):  # jax arrays and friends
        arr = np.asarray(x)
    else:
        return f"is of type {type(x).__name__}, not an array (numpy, torch or jax)"
    if arr.dtype.name not in _ALL_DTYPES:
        return f"dtype {arr.dtype} is not supported (supported: {', '.join(sorted(_ALL_DTYPES))})"
    return _native(arr)


def _flatten_tree(obj: Any, prefix: str, out: dict[str, Any], problems: list[str], leaf: Any) -> None:
    """Flatten nested mappings/lists with "/" joins; ``leaf(x)`` returns an array, None (skip) or a problem."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten_tree(v, f"{prefix}/{k}" if prefix else str(k), out, problems, leaf)
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten_tree(v, f"{prefix}/{i}" if prefix else str(i), out, problems, leaf)
        return
    got = leaf(obj)
    if got is None:
        return
    name = prefix or "array"
    if isinstance(got, str):
        problems.append(f"tensor {name!r}: {got}")
    elif name in out:
        problems.append(f"tensor {name!r}: appears twice after flattening nested keys with '/'")
    else:
        out[name] = got


def _array_leaf(x: Any) -> np.ndarray | None:
    """Tree leaves we keep: arrays and numpy scalars; Python numbers, strings, None are skipped."""
    return np.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else None


def _check_read_dtypes(p: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    problems = [
        f"tensor {k!r}: dtype {a.dtype} is not a tensor dtype exporter reads" for k, a in arrays.items() if a.dtype.name not in _ALL_DTYPES
    ]
    if problems:
        raise StateFileError(
            format_problems(
                f"{p}: holds arrays exporter cannot use (supported dtypes: {', '.join(sorted(_ALL_DTYPES))}); "
                "convert them to a numeric dtype and re-save",
                problems,
            )
        )
    return {k: _normalize(a) for k, a in arrays.items()}


@contextmanager
def _writing(p: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise StateFileError(f"{p}: cannot be written ({e}); check free space, permissions and the path") from e


# ----------------------------------------------------------------------------- sniffing
def _looks_safetensors(head: bytes) -> bool:
    # u64 little-endian header length (high bytes zero for any real file), then the JSON "{".
    return len(head) >= 9 and head[8:9] == b"{" and head[5:8] == b"\0\0\0"


def _looks_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _looks_msgpack(head: bytes, size: int) -> bool:
    # a top-level msgpack map: fixmap 0x81..0x8f, map16 0xde, map32 0xdf, or the empty map 0x80 alone
    return 0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF) or (head[0] == 0x80 and size == 1)


def _read_json(p: Path, what: str) -> Any:
    size = p.stat().st_size
    if size > _JSON_LIMIT:
        raise StateFileError(f"{p}: {what} of {size} bytes is implausibly large (limit {_JSON_LIMIT}); it is not a valid {what}")
    try:
        return json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFileError(f"{p}: {what} is not valid JSON ({e}); {_RESAVE}") from e


def _sniff_zip(p: Path) -> str:
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except Exception as e:  # untrusted bytes: any failure means a broken archive
        raise StateFileError(
            f"{p}: starts like a zip archive (a torch .pt/.pth or an .npz) but its directory cannot be read "
            f"({type(e).__name__}: {e}); the file is probably truncated or corrupt: {_RESAVE}"
        ) from e
    if any(PurePosixPath(n).name == "data.pkl" and n.count("/") <= 1 for n in names):
        return "torch"
    if all(n.endswith(".npy") for n in names):
        return "npz"
    other = sorted(n for n in names if not n.endswith(".npy"))[:3]
    raise StateFileError(
        f"{p}: zip archive that is neither a torch file (no data.pkl) nor an .npz (entries other than .npy, e.g. "
        f"{', '.join(other)}); expected a state file: save one with exporter.state.save_state"
    )


def _sniff_file(p: Path) -> str:
    size = p.stat().st_size
    if size == 0:
        raise StateFileError(
            f"{p}: the file is empty (0 bytes); expected a saved state. It was probably not written completely: {_RESAVE}"
        )
    head = _read_head(p, 16)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _sniff_zip(p)
    if _looks_safetensors(head):  # before pickle: a header length such as 0x0380 starts with 80 03
        return "safetensors"
    if _looks_pickle(head):
        return "torch"
    if head.lstrip()[:1] == b"{":
        doc = _read_json(p, "JSON file")
        if isinstance(doc, dict) and "weight_map" in doc:
            return "hf-sharded"
        raise StateFileError(
            f"{p}: a JSON file but not a Hugging Face index (no 'weight_map'); pass the weights file "
            "(model.safetensors) or model.safetensors.index.json instead"
        )
    if _looks_msgpack(head, size):
        return "flax-msgpack"
    if size < 9:
        raise StateFileError(f"{p}: only {size} bytes, too short to be any state format; the file is truncated: {_RESAVE}")
    raise StateFileError(
        f"{p}: not a known state format (first bytes {head[:8].hex(' ')}); expected safetensors, a torch .pt/.pth "
        "(zip), .npz, .npy, flax msgpack, a Hugging Face index (.index.json) or a checkpoint directory. "
        "Convert it with the framework that wrote it, e.g. safetensors.numpy.save_file(state, 'model.safetensors')"
    )


def _hf_index_in(d: Path) -> Path | None:
    for name in _HF_INDEX_NAMES:
        if (d / name).is_file():
            return d / name
    found = sorted(d.glob("*.index.json"))
    return found[0] if len(found) == 1 else None


def _orbax_items(d: Path) -> list[tuple[str, Path]]:
    """(key prefix, item directory) pairs of an orbax checkpoint at ``d``; [] when it is not one.

    Accepts an item directory (``_METADATA``), a step directory holding item subdirectories
    (keys get an ``"<item>/"`` prefix when there are several), or a CheckpointManager root
    (numeric step subdirectories: the highest step is used).
    """
    if (d / "_METADATA").is_file() or (d / "manifest.ocdbt").is_file():
        return [("", d)]
    subdirs = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
    items = [(c.name, c) for c in subdirs if (c / "_METADATA").is_file()]
    if len(items) == 1:  # the usual single "default"/"state" item: no key prefix
        return [("", items[0][1])]
    if items:
        return items
    steps = [c for c in subdirs if c.name.isdigit() and any((c / m).exists() for m in _ORBAX_MARKERS)]
    if steps:
        return _orbax_items(max(steps, key=lambda c: int(c.name)))
    return []


def _dir_matches(d: Path, fmt: str) -> bool:
    if fmt == "exporter-checkpoint":
        api = _checkpoint_api()
        return bool(api is not None and api.is_checkpoint(d))
    if fmt == "orbax":
        return bool(_orbax_items(d))
    if fmt == "hf-sharded":
        return _hf_index_in(d) is not None
    return False


def _sniff_dir(d: Path) -> str:
    for fmt in ("exporter-checkpoint", "orbax", "hf-sharded"):
        if _dir_matches(d, fmt):
            return fmt
    files = sorted(
        c.name for c in d.iterdir() if c.is_file() and c.suffix in (".safetensors", ".pt", ".pth", ".bin", ".npz", ".msgpack")
    )
    hint = f" It holds {', '.join(files[:5])}: pass one of those files instead." if files else ""
    raise StateFileError(
        f"{d}: is a directory, but not a checkpoint directory exporter can read (expected a state file, an orbax "
        "checkpoint with _METADATA/_CHECKPOINT_METADATA, a Hugging Face sharded checkpoint with "
        f"model.safetensors.index.json, or an exporter checkpoint).{hint}"
    )


def sniff(path: str | os.PathLike[str]) -> str:
    """The format of a saved state, decided from its bytes (files) or contents (directories).

    Args:
        path: a state file or checkpoint directory.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        StateFileError: missing path, empty/truncated file, unknown format, a directory that
            is not a checkpoint.
    """
    p = _existing(path)
    return _sniff_dir(p) if p.is_dir() else _sniff_file(p)


def _resolve(path: str | os.PathLike[str], format: str | None) -> tuple[str, Path]:
    if format is not None and format not in FORMATS:
        raise UsageError(f"unknown state format {format!r}; known formats: {', '.join(FORMATS)}")
    p = _existing(path)
    fmt = sniff(p)
    if format is not None and format != fmt:
        if p.is_dir() and _dir_matches(p, format):
            return format, p
        raise StateFileError(
            f"{p}: holds {fmt} data, not {format}; drop format= (the format is read from the file's bytes, "
            "whatever its name)"
        )
    return fmt, p


# ----------------------------------------------------------------------------- safetensors
_ST_DTYPES = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "U16": ("uint16", 2),
    "I16": ("int16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "F32": ("float32", 4),
    "U64": ("uint64", 8),
    "I64": ("int64", 8),
    "F64": ("float64", 8),
    "C64": ("complex64", 8),
}

# safetensors' own error text -> what it means for the user (checked in order)
_ST_HINTS = (
    ("header too large", f"header longer than {ST_MAX_HEADER:,} bytes"),
    ("invalid header length", "header runs past the end of the file (truncated)"),
    ("header too small", "too short for a safetensors header (truncated)"),
    ("unknown variant", "unknown dtype in the header"),
    ("invalid utf-8", "header is not valid UTF-8"),
    ("invalid json", "header is not valid JSON"),
    ("invalid offset", "overlapping or out-of-range data_offsets (tensors must tile the data section from 0 without gaps)"),
    ("not fully covered", "data section does not match the header (truncated file, out-of-range data_offsets or trailing bytes)"),
    ("invalid shape, data type, or offset", "a tensor's byte range does not equal its shape x dtype size (or its dtype is unsupported)"),
)


def _st_error(p: Path, e: Exception) -> StateFileError:
    text = str(e)
    problem = next((hint for key, hint in _ST_HINTS if key in text.lower()), "invalid safetensors file")
    return StateFileError(f"{p}: {problem} [safetensors: {text}]; the file is corrupt or truncated: {_RESAVE}")


def _st_prevalidate(p: Path) -> None:
    """Fail fast on the header length, without reading a claimed 100 MB+ header."""
    size = p.stat().st_size
    head = _read_head(p, 8)
    if len(head) < 8:
        raise StateFileError(f"{p}: {size} bytes is too short for a safetensors header (truncated); {_RESAVE}")
    (n,) = struct.unpack("<Q", head)
    if n > ST_MAX_HEADER:
        raise StateFileError(
            f"{p}: safetensors header length {n:,} is larger than the format's limit of {ST_MAX_HEADER:,} bytes; "
            f"the file is corrupt or not safetensors: {_RESAVE}"
        )
    if 8 + n > size:
        raise StateFileError(
            f"{p}: safetensors header ({n:,} bytes) runs past the end of the file ({size:,} bytes); "
            f"the file is truncated: {_RESAVE}"
        )


@contextmanager
def _st_open(p: Path) -> Iterator[Any]:
    _st_prevalidate(p)
    from safetensors import safe_open

    try:
        handle = safe_open(p, framework="np")
    except Exception as e:  # SafetensorError and anything else the parser raises on bad bytes
        raise _st_error(p, e) from e
    with handle as f:
        yield f


def _st_unsupported(p: Path, bad: list[str]) -> StateFileError:
    return StateFileError(
        format_problems(
            f"{p}: holds tensors with dtypes exporter cannot read (supported: "
            f"{', '.join(sorted(FORMAT_DTYPES['safetensors']))}); cast them (e.g. to float32) and re-save",
            bad,
        )
    )


_READ_CHUNK = 64 << 20
_PARALLEL_READ_MIN = 128 << 20


def _pread_into(p: Path, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``p`` starting at byte ``offset``; returns the bytes read (short at EOF).

    Large reads are split over a few threads (``os.preadv`` releases the GIL): the copy
    out of the page cache and the first-touch page faults of the destination then run on
    several cores.
    """
    total = len(view)
    if not hasattr(os, "preadv"):  # Windows: one plain sequential read
        with open(p, "rb", buffering=0) as fh:
            fh.seek(offset)
            got = 0
            while got < total:
                n = fh.readinto(view[got:])
                if not n:
                    break
                got += n
            return got
    fd = os.open(p, os.O_RDONLY)
    try:
        workers = min(4, os.cpu_count() or 1) if total >= _PARALLEL_READ_MIN else 1
        part = -(-total // workers)

        def read_range(lo: int, hi: int) -> int:
            done = lo
            while done < hi:
                n = os.preadv(fd, [view[done : min(hi, done + _READ_CHUNK)]], offset + done)
                if n <= 0:
                    break
                done += n
            return done - lo

        if workers == 1:
            return read_range(0, total)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(read_range, lo, min(total, lo + part)) for lo in range(0, total, part)]
            return sum(f.result() for f in futures)
    finally:
        os.close(fd)


def _load_safetensors(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    # The safetensors library validates the header (offsets tile the data section from 0
    # without gaps or overlaps, sizes match shape x dtype, no trailing bytes); we then read
    # the data section with one readinto into one buffer and hand out views of it.  That is
    # one copy of the bytes (page cache -> our memory) instead of two (mmap'd pages, then
    # one array per tensor), so loading costs about the file's size in RSS and runs at
    # memory-copy speed.  Tensors come back in offset order, each a view at its offset.
    with _st_open(p) as f:
        meta = dict(f.metadata() or {})
        order = list(f.keys())
        layout: list[tuple[str, np.dtype, tuple[int, ...], int]] = []
        bad: list[str] = []
        for k in f.offset_keys():
            s = f.get_slice(k)
            code = s.get_dtype()
            if code not in _ST_DTYPES:
                bad.append(f"tensor {k!r}: dtype {code}")
                continue
            name, size = _ST_DTYPES[code]
            shape = tuple(int(d) for d in s.get_shape())
            dtype = _bfloat16() if name == "bfloat16" else np.dtype(name).newbyteorder("<")
            layout.append((k, dtype, shape, math.prod(shape) * size))
    if bad:
        raise _st_unsupported(p, bad)
    (header_len,) = struct.unpack("<Q", _read_head(p, 8))
    start = 8 + header_len
    total = sum(n for *_, n in layout)
    buf = np.empty(total, dtype=np.uint8)
    try:
        got = _pread_into(p, memoryview(buf), start)
    except OSError as e:
        raise StateFileError(f"{p}: cannot be read ({e}); check its permissions") from e
    if got != total:  # the file changed since its header was validated
        raise StateFileError(f"{p}: ended after {got:,} of {total:,} data bytes while reading; the file is truncated: {_RESAVE}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for k, dtype, shape, n in layout:
        chunk = buf[offset : offset + n]
        if offset % dtype.itemsize:  # an odd-sized tensor before this one: copy to align
            chunk = chunk.copy()
        out[k] = chunk.view(dtype).reshape(shape)
        offset += n
    return {k: out[k] for k in order if k in out}, meta


def _info_safetensors(p: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    with _st_open(p) as f:
        meta = dict(f.metadata() or {})
        infos: list[TensorInfo] = []
        bad: list[str] = []
        for k in f.keys():
            s = f.get_slice(k)
            code, shape = s.get_dtype(), tuple(int(d) for d in s.get_shape())
            if code not in _ST_DTYPES:
                bad.append(f"tensor {k!r}: dtype {code}")
                continue
            name, size = _ST_DTYPES[code]
            infos.append(TensorInfo(k, name, shape, math.prod(shape) * size))
    if bad:
        raise _st_unsupported(p, bad)
    return infos, meta


def _write_safetensors(arrays: dict[str, np.ndarray], p: Path, metadata: Mapping[str, str] | None) -> None:
    from safetensors import numpy as st_numpy

    # safetensors.numpy.save builds the file in memory; write_bytes then makes it durable atomically.
    data = st_numpy.save(arrays, metadata=dict(metadata) if metadata else None)
    atomic.write_bytes(p, data)


# ----------------------------------------------------------------------------- torch
def _torch_detail(e: Exception) -> str:
    paras = [s.strip() for s in str(e).split("\n\n") if s.strip()]
    keep = [s for s in paras if not s.startswith(("Weights only load failed", "Check the documentation"))]
    return " ".join(keep or paras[:1]).replace("\n", " ")


def _load_torch(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    torch = _import_torch(f"reading {p} (a torch file)")
    try:
        # A file object, not the path: torch.load hands any path ending in .safetensors to
        # safetensors, and we decide formats from bytes, not names.
        with open(p, "rb") as fh, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise StateFileError(
            f"{p}: refused to load: torch's safe loader (weights_only=True) rejects its pickle ({_torch_detail(e)}). "
            "exporter never unpickles anything else, because unpickling arbitrary objects can run code. If you "
            "trust the file, re-save only the weights (torch.save(model.state_dict(), path)) or convert them to "
            ".safetensors; if it is truncated, re-download it"
        ) from e
    except Exception as e:  # zip/storage errors on untrusted bytes
        raise StateFileError(
            f"{p}: not a readable torch file ({type(e).__name__}: {_torch_detail(e)}); it is corrupt or truncated: {_RESAVE}"
        ) from e

    def leaf(x: Any) -> np.ndarray | str | None:
        if isinstance(x, torch.Tensor):
            return _torch_to_numpy(x)
        if isinstance(x, np.ndarray):
            return x
        return None  # ints, floats, strings, None: not tensors

    out: dict[str, np.ndarray] = {}
    problems: list[str] = []
    _flatten_tree(obj, "", out, problems, leaf)
    if problems:
        raise StateFileError(format_problems(f"{p}: holds tensors exporter cannot convert to numpy; cast them and re-save", problems))
    return out, {}


def _write_torch(arrays: dict[str, np.ndarray], p: Path, metadata: Mapping[str, str] | None) -> None:
    torch = _import_torch(f"writing {p} as a torch file")
    tensors = {k: _numpy_to_torch(v, torch) for k, v in arrays.items()}
    with atomic.atomic_write(p) as fh:
        torch.save(tensors, fh)


# ----------------------------------------------------------------------------- npy / npz
def _npy_check(f: Any, total: int, p: Path, entry: str | None) -> None:
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
        raise StateFileError(f"{where}: invalid .npy header ({e}); {_RESAVE}") from e
    if dtype.hasobject:
        raise StateFileError(
            f"{where}: holds a Python-object array, which can only be read with pickle; exporter never unpickles. "
            "Save numeric arrays instead (np.save(path, arr.astype(np.float32)))"
        )
    expected = math.prod(shape) * dtype.itemsize
    if total - header_len != expected:
        raise StateFileError(
            f"{where}: header declares {dtype} {tuple(shape)} = {expected:,} bytes but {total - header_len:,} bytes follow; "
            f"the file is truncated or corrupt: {_RESAVE}"
        )


def _load_npy_array(p: Path) -> np.ndarray:
    with open(p, "rb") as f:
        _npy_check(f, p.stat().st_size, p, None)
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as e:
        raise StateFileError(f"{p}: not a readable .npy file ({e}); {_RESAVE}") from e
    return _check_read_dtypes(p, {"array": arr})["array"]


def _load_npy(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return {"array": _load_npy_array(p)}, {_CONTAINER_KEY: "array"}


def _load_npz(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                with zf.open(info) as f:
                    _npy_check(f, info.file_size, p, info.filename)
        out: dict[str, np.ndarray] = {}
        with np.load(p, allow_pickle=False) as npz:
            for name in npz.files:
                out[name] = npz[name]
    except StateFileError:
        raise
    except Exception as e:  # bad CRC, bad header, truncated entry
        raise StateFileError(f"{p}: not a readable .npz file ({type(e).__name__}: {e}); {_RESAVE}") from e
    meta: dict[str, str] = {}
    if _NPZ_MARKER in out:
        meta[_CONTAINER_KEY] = out.pop(_NPZ_MARKER).tobytes().decode("ascii", "replace")
    return out, meta


def _write_npz(arrays: dict[str, np.ndarray], p: Path, metadata: Mapping[str, str] | None) -> None:
    from numpy.lib import format as npf

    # Not np.savez: its keyword interface cannot take keys such as "file"; this is what it does inside.
    with atomic.atomic_write(p) as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for k, v in arrays.items():
            with zf.open(k + ".npy", "w", force_zip64=True) as f:
                npf.write_array(f, v, allow_pickle=False)


def _write_npy(arr: np.ndarray, p: Path) -> None:
    from numpy.lib import format as npf

    with atomic.atomic_write(p) as fh:
        npf.write_array(fh, arr, allow_pickle=False)


# ----------------------------------------------------------------------------- trees (msgpack, orbax)
def _unflatten(arrays: Mapping[str, np.ndarray], problems: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key in sorted(arrays):
        parts = key.split("/")
        if any(not s for s in parts):
            problems.append(f"tensor {key!r}: empty path segment; tree formats split keys on '/'")
            continue
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"tensor {key!r}: {'/'.join(parts[: i + 1])!r} is both a tensor and a subtree")
                break
            node = child
        else:
            if parts[-1] in node:
                problems.append(f"tensor {key!r}: is both a tensor and a subtree")
            else:
                node[parts[-1]] = arrays[key]
    return tree


def _load_msgpack(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    serialization = _import_jax_module("flax.serialization", f"reading {p} (a flax msgpack file)")
    try:
        tree = serialization.msgpack_restore(p.read_bytes())
    except Exception as e:  # msgpack/numpy errors on untrusted bytes
        raise StateFileError(
            f"{p}: not a readable flax msgpack file ({type(e).__name__}: {e}); it is truncated or corrupt: {_RESAVE}"
        ) from e
    out: dict[str, np.ndarray] = {}
    problems: list[str] = []
    _flatten_tree(tree, "", out, problems, _array_leaf)
    if problems:
        raise StateFileError(format_problems(f"{p}: inconsistent msgpack tree", problems))
    return out, {}


def _write_msgpack(arrays: dict[str, np.ndarray], p: Path, metadata: Mapping[str, str] | None) -> None:
    serialization = _import_jax_module("flax.serialization", f"writing {p} as flax msgpack")
    problems: list[str] = []
    tree = _unflatten(arrays, problems)
    assert not problems, problems  # checked in _check_write
    atomic.write_bytes(p, serialization.msgpack_serialize(tree))


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def _load_orbax(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    jax = _import_jax_module("jax", f"reading {p} (an orbax checkpoint)")
    ocp = _import_jax_module("orbax.checkpoint", f"reading {p} (an orbax checkpoint)")
    out: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for prefix, item in _orbax_items(p):
        try:
            ckptr = ocp.PyTreeCheckpointer()
            item = item.resolve()  # orbax misreads relative paths
            meta = ckptr.metadata(item)
            tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)

            def restore_arg(m: Any) -> Any:
                if type(m).__name__ == "ArrayMetadata":
                    return ocp.RestoreArgs(restore_type=np.ndarray)
                return ocp.RestoreArgs()

            args = jax.tree_util.tree_map(restore_arg, tree)
            restored = ckptr.restore(item, args=ocp.args.PyTreeRestore(restore_args=args))
        except Exception as e:  # orbax/tensorstore errors on a damaged directory
            raise StateFileError(
                f"{item}: not a readable orbax checkpoint ({type(e).__name__}: {_first_line(e)}); it is incomplete or "
                "corrupt: re-save it (exporter.state.save_state(..., format='orbax'))"
            ) from e
        _flatten_tree(restored, prefix, out, problems, _array_leaf)
    if problems:
        raise StateFileError(format_problems(f"{p}: inconsistent orbax tree", problems))
    return out, {}


def _write_orbax(arrays: dict[str, np.ndarray], p: Path, metadata: Mapping[str, str] | None) -> None:
    ocp = _import_jax_module("orbax.checkpoint", f"writing {p} as an orbax checkpoint")
    problems: list[str] = []
    tree = _unflatten(arrays, problems)
    assert not problems, problems  # checked in _check_write
    with atomic.atomic_dir(p) as tmp:
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


# ----------------------------------------------------------------------------- HF sharded
def _hf_index_path(p: Path) -> Path:
    if p.is_dir():
        idx = _hf_index_in(p)
        assert idx is not None, p  # sniffed as hf-sharded
        return idx
    return p


def _hf_shards(p: Path) -> tuple[Path, dict[str, str], dict[str, Path], dict[str, str]]:
    """Validate an index: returns (index path, weight_map, shard name -> path, metadata)."""
    idx = _hf_index_path(p)
    doc = _read_json(idx, "Hugging Face index")
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise StateFileError(f"{idx}: 'weight_map' must map tensor names to shard file names; {_RESAVE}")
    meta_raw = doc.get("metadata") or {}
    meta = {str(k): str(v) for k, v in meta_raw.items()} if isinstance(meta_raw, dict) else {}
    problems: list[str] = []
    shards: dict[str, Path] = {}
    for name in sorted(set(wmap.values())):
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            problems.append(f"shard {name!r}: must be a file name inside {idx.parent} (no absolute paths or '..')")
        elif not (idx.parent / rel).exists():
            problems.append(f"shard {name!r}: missing (named by the index for {sum(v == name for v in wmap.values())} tensors)")
        elif (idx.parent / rel).is_dir():
            problems.append(f"shard {name!r}: is a directory, expected a weights file")
        else:
            shards[name] = idx.parent / rel
    if problems:
        raise StateFileError(
            format_problems(f"{idx}: Hugging Face index names shards that cannot be used; download or restore them", problems)
        )
    return idx, wmap, shards, meta


def _hf_check_keys(idx: Path, wmap: dict[str, str], shard_keys: dict[str, list[str]]) -> None:
    problems: list[str] = []
    seen: dict[str, str] = {}
    for shard, keys in sorted(shard_keys.items()):
        for k in keys:
            if k in seen:
                problems.append(f"tensor {k!r}: duplicated in shards {seen[k]!r} and {shard!r}")
                continue
            seen[k] = shard
            if k not in wmap:
                problems.append(f"tensor {k!r}: in shard {shard!r} but not listed in the index")
            elif wmap[k] != shard:
                problems.append(f"tensor {k!r}: in shard {shard!r} but the index maps it to {wmap[k]!r}")
    for k, shard in wmap.items():
        if shard in shard_keys and k not in seen:
            problems.append(f"tensor {k!r}: the index maps it to {shard!r}, which does not contain it")
    if problems:
        raise StateFileError(
            format_problems(f"{idx}: index and shards disagree; the checkpoint is inconsistent, re-download or re-save it", problems)
        )


def _load_hf(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    idx, wmap, shards, meta = _hf_shards(p)
    loaded: dict[str, dict[str, np.ndarray]] = {}
    for name, sp in shards.items():
        fmt = _sniff_file(sp)
        if fmt not in ("safetensors", "torch"):
            raise StateFileError(f"{sp}: shard of {idx} holds {fmt} data; expected safetensors or a torch file")
        loaded[name] = _LOADERS[fmt](sp)[0]
    _hf_check_keys(idx, wmap, {n: list(a) for n, a in loaded.items()})
    out: dict[str, np.ndarray] = {}
    for arrays in loaded.values():
        out.update(arrays)
    return out, meta


# ----------------------------------------------------------------------------- exporter checkpoints
def _load_exporter_checkpoint(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    api = _checkpoint_api()
    assert api is not None  # sniffed through it
    return dict(api.load_model_state(p)), {}


_LOADERS = {
    "safetensors": _load_safetensors,
    "torch": _load_torch,
    "npz": _load_npz,
    "npy": _load_npy,
    "flax-msgpack": _load_msgpack,
    "orbax": _load_orbax,
    "hf-sharded": _load_hf,
    "exporter-checkpoint": _load_exporter_checkpoint,
}
_WRITERS = {
    "safetensors": _write_safetensors,
    "torch": _write_torch,
    "npz": _write_npz,
    "flax-msgpack": _write_msgpack,
    "orbax": _write_orbax,
}


def _load(path: str | os.PathLike[str], format: str | None) -> tuple[str, Path, dict[str, np.ndarray], dict[str, str]]:
    fmt, p = _resolve(path, format)
    arrays, meta = _LOADERS[fmt](p)
    return fmt, p, _check_read_dtypes(p, arrays), meta


# ----------------------------------------------------------------------------- public API
def load_state(path: str | os.PathLike[str], *, format: str | None = None) -> dict[str, np.ndarray]:
    """Read saved state as a flat ``{name: array}`` dict, exactly as stored.

    Args:
        path: a state file (any name: the format is sniffed from its bytes) or a checkpoint
            directory (orbax, Hugging Face sharded, exporter checkpoint).
        format: optional expectation, one of :data:`FORMATS`; a file holding another
            format is an error.  For a directory that matches several (an exporter
            checkpoint stored with orbax) it picks the reader.

    Returns:
        Arrays keyed by stored name; nested trees flattened with ``"/"``; a lone ``.npy``
        array under the key ``"array"``.

    Raises:
        StateFileError: missing, empty, truncated, corrupt, unsafe or unknown input.
        MissingDependencyError: reading needs torch or jax/flax/orbax and it is missing.
        UsageError: an unknown ``format`` name.
    """
    return _load(path, format)[2]


def _write_format(p: Path, format: str | None, allowed: tuple[str, ...]) -> str:
    if format is not None:
        if format not in allowed:
            raise UsageError(f"cannot write format {format!r}; writable formats: {', '.join(allowed)}")
        return format
    suffix = p.suffix.lower()
    if suffix == ".json":
        raise UsageError(f"{p}: Hugging Face sharded checkpoints are read-only here; write a .safetensors file instead")
    if suffix == ".npy":
        raise UsageError(f"{p}: .npy holds a single array, not named state; use save_arrays(array, path) or a .safetensors/.npz path")
    fmt = _SUFFIX_FORMAT.get(suffix, "safetensors")
    if fmt not in allowed:
        raise UsageError(f"{p}: cannot write {fmt} here; use one of {', '.join(allowed)} (format=...)")
    return fmt


def _check_write(p: Path, fmt: str, arrays: dict[str, np.ndarray], metadata: Mapping[str, str] | None) -> None:
    problems: list[str] = []
    supported = FORMAT_DTYPES[fmt]
    for k, a in arrays.items():
        if a.dtype.name not in supported:
            problems.append(f"tensor {k!r}: dtype {a.dtype.name} cannot be stored in {fmt} (it holds: {', '.join(sorted(supported))})")
        if fmt == "orbax" and a.size == 0:
            problems.append(f"tensor {k!r}: orbax cannot store zero-size arrays (shape {a.shape})")
    if fmt in ("flax-msgpack", "orbax"):
        _unflatten(arrays, problems)
    if fmt == "orbax":
        if not arrays:
            problems.append("orbax cannot store an empty state")
        seen: dict[str, str] = {}
        for k in sorted(arrays):
            dotted = k.replace("/", ".")  # orbax names its arrays by the dotted tree path
            if dotted in seen:
                problems.append(f"tensor {k!r}: orbax would store it under the same name as {seen[dotted]!r}")
            seen[dotted] = k
    if metadata is not None:
        if fmt != "safetensors":
            problems.append(f"metadata can only be stored in safetensors, not {fmt}")
        elif not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            problems.append("metadata must map str to str")
    if problems:
        raise UsageError(format_problems(f"{p}: cannot save this state as {fmt}; pick another format or convert the tensors", problems))
    if fmt == "orbax":
        if p.exists() and not (p.is_dir() and (not any(p.iterdir()) or _orbax_items(p))):
            raise UsageError(f"{p}: exists and is not an orbax checkpoint; refusing to replace it. Choose a new directory")
    elif p.is_dir():
        raise UsageError(f"{p}: is a directory; expected a file path such as {p / 'model.safetensors'}")


def _collect(state: Any, what: str, *, nested: bool) -> dict[str, np.ndarray]:
    if not isinstance(state, Mapping):
        raise UsageError(
            f"{what} must be a mapping of name -> array, got {type(state).__name__}; for a raw array or a list "
            "of arrays use save_arrays"
        )
    out: dict[str, np.ndarray] = {}
    problems: list[str] = []

    def walk(obj: Mapping[Any, Any], prefix: str) -> None:
        for k, v in obj.items():
            if not isinstance(k, str):
                problems.append(f"key {k!r}: keys must be str")
                continue
            name = f"{prefix}/{k}" if prefix else k
            if isinstance(v, Mapping) and nested:
                walk(v, name)
                continue
            got = _to_numpy(v)
            if isinstance(got, str):
                problems.append(f"tensor {name!r}: {got}")
            elif name in out:
                problems.append(f"tensor {name!r}: given twice (nested and as a '/'-joined key)")
            else:
                out[name] = got

    walk(state, "")
    if problems:
        raise UsageError(format_problems(f"{what} cannot be saved", problems))
    return out


def save_state(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write state atomically; :func:`load_state` returns it bit-exactly.

    Args:
        state: ``{name: array}`` (numpy arrays, torch tensors or jax arrays); nested mappings
            (flax variables) are stored under ``"/"``-joined names.
        path: destination file (a directory for orbax).
        format: one of :data:`WRITE_FORMATS`; default from the suffix (``.safetensors``,
            ``.pt``/``.pth``/``.bin`` torch, ``.npz``, ``.msgpack`` flax, ``.orbax``),
            safetensors for any other suffix.
        metadata: ``str -> str`` header metadata (safetensors only).

    Returns:
        The path written.

    Raises:
        UsageError: a value that is not an array, a dtype the format cannot hold (see
            :data:`FORMAT_DTYPES`), keys a tree format cannot nest, metadata for a format
            without it, a directory in the way.
        StateFileError: the write itself failed (disk full, permissions); the previous
            file, if any, is intact.
        MissingDependencyError: the format needs torch or jax/flax/orbax.
    """
    p = Path(path)
    fmt = _write_format(p, format, WRITE_FORMATS)
    arrays = _collect(state, f"{p}: state", nested=True)
    _check_write(p, fmt, arrays, metadata)
    with _writing(p):
        _WRITERS[fmt](arrays, p, metadata)
    return p


def sha256_path(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, or of a directory tree.

    A directory hashes, in sorted order of relative POSIX path, one line
    ``"<relative path>\\0<file sha256>\\n"`` per regular file (symlinked directories are
    not followed).

    Args:
        path: file or directory.

    Returns:
        Lowercase hex digest.

    Raises:
        StateFileError: the path does not exist or cannot be read.
    """
    p = _existing(path)
    try:
        if p.is_dir():
            entries = []
            for dirpath, _dirs, files in os.walk(p):
                for name in files:
                    f = Path(dirpath) / name
                    entries.append((f.relative_to(p).as_posix(), f))
            return _hash_entries(sorted(entries))
        return _file_sha256(p)
    except OSError as e:
        raise StateFileError(f"{path}: cannot be read for hashing ({e}); check its permissions") from e


def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_entries(entries: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for rel, f in entries:
        h.update(f"{rel}\0{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def _describe(arrays: Mapping[str, np.ndarray]) -> list[TensorInfo]:
    return [TensorInfo(k, a.dtype.name, tuple(int(d) for d in a.shape), int(a.nbytes)) for k, a in arrays.items()]


def inspect_state(path: str | os.PathLike[str], *, format: str | None = None) -> StateInfo:
    """Describe saved state without converting it: format, tensors, sizes and a content hash.

    safetensors files (and safetensors shards) are described from their header alone.

    Args:
        path: as for :func:`load_state`.
        format: as for :func:`load_state`.

    Returns:
        A :class:`StateInfo`; ``sha256`` covers the file, the directory tree, or (HF
        sharded) the index plus its shards.

    Raises:
        StateFileError: as :func:`load_state`.
    """
    fmt, p = _resolve(path, format)
    meta: dict[str, str] = {}
    if fmt == "safetensors":
        infos, meta = _info_safetensors(p)
    elif fmt == "hf-sharded" and all(_sniff_file(sp) == "safetensors" for sp in _hf_shards(p)[2].values()):
        idx, wmap, shards, meta = _hf_shards(p)
        infos, keys = [], {}
        for name, sp in shards.items():
            shard_infos, _ = _info_safetensors(sp)
            infos += shard_infos
            keys[name] = [t.name for t in shard_infos]
        _hf_check_keys(idx, wmap, keys)
    else:
        _, _, arrays, meta = _load(p, fmt)
        infos = _describe(arrays)
    if fmt == "hf-sharded":
        idx, _, shards, _ = _hf_shards(p)
        digest = _hash_entries(sorted([(idx.name, idx), *shards.items()]))
    else:
        digest = sha256_path(p)
    infos.sort(key=lambda t: t.name)
    return StateInfo(
        path=str(p),
        format=fmt,
        tensors=tuple(infos),
        total_bytes=sum(t.nbytes for t in infos),
        sha256=digest,
        metadata=meta,
    )


def save_arrays(obj: Any, path: str | os.PathLike[str], *, format: str | None = None) -> Path:
    """Save a raw array, a list of arrays or a flat dict of arrays, without pickle.

    Args:
        obj: an array (numpy/torch/jax), a list or tuple of arrays, or ``{str: array}``.
        path: destination; ``.npy`` (a single array only), ``.npz``, otherwise safetensors.
        format: ``"npy"``, ``"npz"`` or ``"safetensors"`` to override the suffix.

    Returns:
        The path written.  :func:`load_arrays` returns the same kind of object (a tuple
        comes back as a list).

    Raises:
        UsageError: non-array values, nested dicts, a dtype the format cannot hold, a list
            or dict into ``.npy``.
        StateFileError: the write failed.
    """
    p = Path(path)
    allowed = ("safetensors", "npz", "npy")
    if format is None and p.suffix.lower() == ".npy":
        format = "npy"
    fmt = _write_format(p, format, allowed)
    if isinstance(obj, Mapping):
        kind, arrays = "dict", _collect(obj, f"{p}: arrays", nested=False)
        if _NPZ_MARKER in arrays:
            raise UsageError(f"key {_NPZ_MARKER!r} is reserved by exporter; rename it")
    elif isinstance(obj, (list, tuple)):
        kind, arrays = "list", _collect({str(i): a for i, a in enumerate(obj)}, f"{p}: arrays", nested=False)
    else:
        kind, arrays = "array", _collect({"array": obj}, f"{p}: array", nested=False)
    if fmt == "npy":
        if kind != "array":
            raise UsageError(f"{p}: .npy holds a single array, not a {kind}; use .npz or .safetensors")
        _check_write(p, "npy", arrays, None)
        with _writing(p):
            _write_npy(arrays["array"], p)
        return p
    _check_write(p, fmt, arrays, None)
    with _writing(p):
        if fmt == "safetensors":
            _write_safetensors(arrays, p, {_CONTAINER_KEY: kind})
        else:
            marker = {_NPZ_MARKER: np.frombuffer(kind.encode("ascii"), dtype=np.uint8).copy()} if kind != "dict" else {}
            _write_npz({**arrays, **marker}, p, None)
    return p


def load_arrays(path: str | os.PathLike[str]) -> Any:
    """Load what :func:`save_arrays` wrote: an array, a list of arrays or a dict of arrays.

    Any other state file loads as a dict (as :func:`load_state`); an ``.npy`` as an array.

    Args:
        path: the file (format sniffed from its bytes).

    Returns:
        ``np.ndarray``, ``list[np.ndarray]`` or ``dict[str, np.ndarray]``.

    Raises:
        StateFileError: as :func:`load_state`, or a container marker that does not match
            the stored keys.
    """
    fmt, p, arrays, meta = _load(path, None)
    kind = meta.get(_CONTAINER_KEY, "dict")
    if kind == "dict":
        return arrays
    if kind == "array" and set(arrays) == {"array"}:
        return arrays["array"]
    if kind == "list" and set(arrays) == {str(i) for i in range(len(arrays))}:
        return [arrays[str(i)] for i in range(len(arrays))]
    raise StateFileError(
        f"{p}: marked as container {kind!r} but holds keys {sorted(arrays)[:5]}; the file was altered: re-save it "
        "with save_arrays"
    )
