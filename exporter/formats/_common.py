"""What every format module shares: dtypes, result types, the one-pass file reader, array helpers.

A format module never imports another layer above ``exporter.formats``; it imports this
module, ``exporter.hashing``, ``exporter.atomic``, ``exporter.deps`` and ``exporter.errors``
(and, for the formats that delegate, a sibling format module or ``exporter.checkpoint``).
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from exporter.errors import StateFileError
from exporter.hashing import sha256_bytes

COMMON = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
    + ["float16", "float32", "float64", "complex64"]
)
#: Every dtype some format stores bit-exactly; anything else is refused on read and write.
ALL_DTYPES = COMMON | {"bfloat16", "complex128"}

RESAVE = "re-save it (exporter.state.save_state) or re-download it"
CONTAINER_KEY = "exporter.container"  # safetensors metadata written by save_arrays
NPZ_MARKER = "__exporter_container__"  # the same, as an npz entry (npz has no metadata)
JSON_LIMIT = 100_000_000  # an HF index is kilobytes; refuse to parse anything huge
HEAD = 16  # bytes a sniffer may look at


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
    """What a saved-state file or directory holds (see :func:`exporter.state.inspect_state`)."""

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


class Read(NamedTuple):
    """What a format module's ``read`` returns (``sha256`` is ``""`` unless asked for)."""

    path: Path
    arrays: dict[str, np.ndarray]
    metadata: dict[str, str]
    sha256: str


def state_info(path: Path, fmt: str, tensors: list[TensorInfo], sha256: str, metadata: Mapping[str, str]) -> StateInfo:
    tensors = sorted(tensors, key=lambda t: t.name)
    return StateInfo(str(path), fmt, tuple(tensors), sum(t.nbytes for t in tensors), sha256, dict(metadata))


def tensor_infos(arrays: Mapping[str, np.ndarray]) -> list[TensorInfo]:
    return [TensorInfo(k, a.dtype.name, tuple(int(d) for d in a.shape), int(a.nbytes)) for k, a in arrays.items()]


# ----------------------------------------------------------------------------- reading files
_READ_CHUNK = 64 << 20
_PARALLEL_READ_MIN = 128 << 20


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` starting at byte ``offset``; returns the bytes read (short at EOF).

    Large reads are split over a few threads (``os.preadv`` releases the GIL): the copy
    out of the page cache and the first-touch page faults of the destination then run on
    several cores.
    """
    total = len(view)
    if not hasattr(os, "preadv"):  # Windows: one plain sequential read
        os.lseek(fd, offset, os.SEEK_SET)
        got = 0
        while got < total:
            data = os.read(fd, min(_READ_CHUNK, total - got))
            if not data:
                break
            view[got : got + len(data)] = data
            got += len(data)
        return got
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
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(read_range, lo, min(total, lo + part)) for lo in range(0, total, part)]
        return sum(f.result() for f in futures)


def read_file(p: Path) -> np.ndarray:
    """The whole file as one writeable uint8 buffer: one open, one copy out of the page cache."""
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            size = os.fstat(fd).st_size
            buf = np.empty(size, dtype=np.uint8)
            got = _pread_into(fd, memoryview(buf), 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise StateFileError(f"{p}: cannot be read ({e}); check its permissions") from e
    if got != size:  # the file shrank while we read it
        raise StateFileError(f"{p}: ended after {got:,} of {size:,} bytes while reading; the file is truncated: {RESAVE}")
    return buf


class MemoryReader(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it (``io.BytesIO`` copies)."""

    def __init__(self, buf: Any) -> None:
        super().__init__()
        self._view = memoryview(buf).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        memoryview(b).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


class Source:
    """One input being recognised and read: a directory, or a file.

    A file source either holds all of the file's bytes (:meth:`load`: read once, then
    sniffed, hashed and parsed from that one buffer) or only its first bytes
    (:meth:`probe`: enough to sniff; a reader then streams the file itself).
    """

    def __init__(self, path: Path, *, is_dir: bool, size: int = 0, head: bytes = b"", data: np.ndarray | None = None) -> None:
        self.path = path
        self.is_dir = is_dir
        self.size = size
        self.head = head
        self._data = data
        self._zip_names: list[str] | None = None
        self._json: Any = None

    @classmethod
    def probe(cls, path: str | os.PathLike[str]) -> Source:
        """A directory, or a file's size and first :data:`HEAD` bytes (one open)."""
        p = existing(path)
        if p.is_dir():
            return cls(p, is_dir=True)
        try:
            with open(p, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                head = fh.read(HEAD)
        except OSError as e:
            raise StateFileError(f"{p}: cannot be read ({e}); check its permissions") from e
        return cls(p, is_dir=False, size=size, head=head)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Source:
        """A directory, or all of a file's bytes (one open)."""
        p = existing(path)
        if p.is_dir():
            return cls(p, is_dir=True)
        data = read_file(p)
        return cls(p, is_dir=False, size=len(data), head=bytes(data[:HEAD]), data=data)

    @property
    def loaded(self) -> bool:
        return self._data is not None

    def data(self) -> np.ndarray:
        """All of the file's bytes (read now, once, if this source was only probed)."""
        assert not self.is_dir, self.path
        if self._data is None:
            self._data = read_file(self.path)
            self.size = len(self._data)
        return self._data

    @contextmanager
    def stream(self) -> Iterator[BinaryIO]:
        """The file as a binary stream: over the bytes in memory, else the file itself."""
        assert not self.is_dir, self.path
        if self._data is not None:
            # unbuffered: a BufferedReader would copy every large read once more, in pieces
            with MemoryReader(self._data) as fh:
                yield fh  # type: ignore[misc]
            return
        try:
            fh = open(self.path, "rb")
        except OSError as e:
            raise StateFileError(f"{self.path}: cannot be read ({e}); check its permissions") from e
        with fh:
            yield fh

    def zip_names(self) -> list[str]:
        """Entry names of a zip archive (a torch file or an .npz); read once."""
        if self._zip_names is None:
            try:
                with self.stream() as fh, zipfile.ZipFile(fh) as zf:
                    self._zip_names = zf.namelist()
            except StateFileError:
                raise
            except Exception as e:  # untrusted bytes: any failure means a broken archive
                raise StateFileError(
                    f"{self.path}: starts like a zip archive (a torch .pt/.pth or an .npz) but its directory cannot be "
                    f"read ({type(e).__name__}: {e}); the file is probably truncated or corrupt: {RESAVE}"
                ) from e
        return self._zip_names

    def is_zip(self) -> bool:
        return not self.is_dir and self.head[:4] in (b"PK\x03\x04", b"PK\x05\x06")

    def json(self, what: str) -> Any:
        """The file parsed as JSON (an HF index); read once."""
        if self._json is None:
            if self.size > JSON_LIMIT:
                raise StateFileError(
                    f"{self.path}: {what} of {self.size} bytes is implausibly large (limit {JSON_LIMIT}); "
                    f"it is not a valid {what}"
                )
            self._json = parse_json(self.data(), self.path, what)
        return self._json

    def sha256(self) -> str:
        return sha256_bytes(self.data())


def hashed(src: Source, digest: bool, parse: Callable[[], tuple[dict[str, np.ndarray], dict[str, str]]]) -> Read:
    """``parse()`` the file of ``src``; with ``digest``, hash its bytes in memory meanwhile.

    hashlib releases the GIL, so the hash runs on a second core while the parse runs here.
    """
    if not digest:
        return Read(src.path, *parse(), "")
    data = src.data()
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(sha256_bytes, data)
        arrays, meta = parse()
        return Read(src.path, arrays, meta, fut.result())


def existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise StateFileError(
            f"{path}: no such file or directory; expected a saved state (e.g. model.safetensors, "
            "weights.pt, params.msgpack) or a checkpoint directory. Check the path"
        )
    return p


def parse_json(data: Any, p: Path, what: str) -> Any:
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFileError(f"{p}: {what} is not valid JSON ({e}); {RESAVE}") from e


@contextmanager
def writing(p: Path) -> Iterator[None]:
    """Turn an OSError of a write into a StateFileError naming the file."""
    try:
        yield
    except OSError as e:
        raise StateFileError(f"{p}: cannot be written ({e}); check free space, permissions and the path") from e


def first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


# ----------------------------------------------------------------------------- arrays
def bfloat16() -> np.dtype:
    import ml_dtypes  # a dependency of onnx, so always present; imported late to keep import cheap

    return np.dtype(ml_dtypes.bfloat16)


def native(arr: np.ndarray) -> np.ndarray:
    """Native byte order and C-contiguous (copies only when needed)."""
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr if arr.flags.c_contiguous else np.array(arr, order="C")  # (ascontiguousarray makes 0-d 1-d)


def normalize(arr: np.ndarray) -> np.ndarray:
    """Native byte order, C-contiguous and writeable (copies only when needed)."""
    arr = native(arr)
    return arr if arr.flags.writeable else arr.copy()


def is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach") and hasattr(x, "dtype")


def torch_to_numpy(t: Any) -> np.ndarray | str:
    """A torch tensor as numpy (sharing memory when possible), or a problem string."""
    import torch  # only called with a torch tensor in hand, so torch is importable

    t = t.detach()
    if t.layout != torch.strided or t.is_quantized:
        return f"layout {t.layout}{' (quantized)' if t.is_quantized else ''} is not a dense tensor"
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(bfloat16())
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        return f"dtype {str(t.dtype).removeprefix('torch.')} is not supported"


def numpy_to_torch(arr: np.ndarray, torch: Any) -> Any:
    with warnings.catch_warnings():  # read-only arrays: torch only reads them here
        warnings.simplefilter("ignore", UserWarning)
        if arr.dtype == bfloat16():
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


def to_numpy(x: Any) -> np.ndarray | str:
    """Convert one user value to a numpy array, or return why it cannot be stored."""
    if isinstance(x, np.ndarray):
        arr = x
    elif isinstance(x, np.generic):
        arr = np.asarray(x)
    elif is_torch_tensor(x):
        got = torch_to_numpy(x)
        if isinstance(got, str):
            return got
        arr = got
    elif hasattr(x, "__array__") and not isinstance(x, (str, bytes)):  # jax arrays and friends
        arr = np.asarray(x)
    else:
        return f"is of type {type(x).__name__}, not an array (numpy, torch or jax)"
    if arr.dtype.name not in ALL_DTYPES:
        return f"dtype {arr.dtype} is not supported (supported: {', '.join(sorted(ALL_DTYPES))})"
    return native(arr)


def checked(p: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Refuse dtypes exporter cannot use; normalise the rest (native order, C order, writeable)."""
    problems = [
        f"tensor {k!r}: dtype {a.dtype} is not a tensor dtype exporter reads" for k, a in arrays.items() if a.dtype.name not in ALL_DTYPES
    ]
    if problems:
        raise StateFileError.listing(
            f"{p}: holds arrays exporter cannot use (supported dtypes: {', '.join(sorted(ALL_DTYPES))}); "
            "convert them to a numeric dtype and re-save",
            problems,
        )
    return {k: normalize(a) for k, a in arrays.items()}


# ----------------------------------------------------------------------------- trees
def flatten_tree(obj: Any, prefix: str, out: dict[str, Any], problems: list[str], leaf: Callable[[Any], Any]) -> None:
    """Flatten nested mappings/lists with "/" joins; ``leaf(x)`` returns an array, None (skip) or a problem."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            flatten_tree(v, f"{prefix}/{k}" if prefix else str(k), out, problems, leaf)
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten_tree(v, f"{prefix}/{i}" if prefix else str(i), out, problems, leaf)
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


def array_leaf(x: Any) -> np.ndarray | None:
    """Tree leaves we keep: arrays and numpy scalars; Python numbers, strings, None are skipped."""
    return np.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else None


def unflatten(arrays: Mapping[str, np.ndarray], problems: list[str]) -> dict[str, Any]:
    """``"a/b/c"`` keys as nested dicts (tree formats); conflicts go to ``problems``."""
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


# ----------------------------------------------------------------------------- save checks
def no_metadata(fmt: str, metadata: Mapping[str, str] | None) -> list[str]:
    """The problem of passing metadata to a format that cannot store it."""
    return [] if metadata is None else [f"metadata can only be stored in safetensors, not {fmt}"]


def file_target(p: Path) -> list[str]:
    """The problem of a directory where a single-file format is to be written."""
    return [f"{p}: is a directory; expected a file path such as {p / 'model.safetensors'}"] if p.is_dir() else []
