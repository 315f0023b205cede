"""Checkpoint file I/O at disk speed: hashed while written, hashed while read, tensors as views.

Writing (:func:`write_safetensors`, :func:`write_blob`): the bytes go from the arrays'
own memory to the file in :data:`CHUNK` pieces (no serialised copy of the file is built),
and every piece is hashed on its way out: the file's digest and each tensor's digest come
from that one stream, never from reading the file back.  On large files (over
:data:`SYNC_EVERY` bytes) the pieces are hashed in order on a worker thread while this one
writes them (hashlib and blake3 release the GIL), and a second helper thread asks the kernel to start writing back what has been written so far (``fdatasync`` every
:data:`SYNC_EVERY` bytes), so the durability the caller demands afterwards (``fsync`` of
every file before the directory is published) no longer waits for the whole file at the
end.  Errors from that thread (``EIO``, ``ENOSPC``) are raised by the writer.

The safetensors files are byte for byte what ``safetensors.numpy.save`` writes for the
same arrays and metadata (header JSON with ``__metadata__`` first, tensors ordered by
dtype alignment, then name, the header padded with spaces to a multiple of 8), so any
safetensors reader opens them and every tensor starts aligned to its item size.

Reading (:func:`read_hashed`): a file goes into one preallocated buffer with ``readinto``
while a worker thread hashes the pieces already read (hashlib and blake3 release the GIL),
so hashing overlaps with the disk.  :func:`views` then checks that the file's header is
exactly the one :func:`safetensors_prefix` writes for the tensors the caller expects and
returns each tensor as a view of that buffer: no tensor is copied.  A file whose header
differs (another writer, damage) returns None and the caller parses it the slow way.

Lower layer: imports ``exporter.hashing`` and numpy only.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from exporter.hashing import new_hash

__all__ = ["CHUNK", "SYNC_EVERY", "ST_CODES", "safetensors_prefix", "write_blob", "write_safetensors", "read_hashed", "views"]

CHUNK = 8 << 20
SYNC_EVERY = 64 << 20
#: numpy dtype name -> safetensors dtype code, in safetensors' own order (its writer sorts
#: tensors by this order, largest first, then by name).
ST_CODES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "complex64": "C64",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
}
_RANK = {name: i for i, name in enumerate(ST_CODES)}


def safetensors_prefix(
    tensors: Mapping[str, tuple[str, tuple[int, ...] | list[int]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[str, int, int]]]:
    """The 8-byte length and padded JSON header of a safetensors file, and the data layout.

    Args:
        tensors: name -> (numpy dtype name, shape); dtypes from :data:`ST_CODES`.
        metadata: the ``__metadata__`` (None: no such entry).

    Returns:
        (prefix bytes, [(name, begin, end)] in file order; offsets relative to the data section).
    """
    order = sorted(tensors, key=lambda n: (-_RANK[tensors[n][0]], n))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    layout = []
    offset = 0
    for name in order:
        dtype, shape = tensors[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": ST_CODES[dtype], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        layout.append((name, offset, offset + nbytes))
        offset += nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, layout


def _write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte is written (the one place bytes reach a checkpoint file)."""
    while data:
        data = data[os.write(fd, data) :]


class _Writer:
    """A file being written: hashes each piece, and starts write-back of large files early."""

    def __init__(self, path: Path, algorithm: str, total: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.hasher = new_hash(algorithm)
        self.algorithm = algorithm
        self.written = 0
        self._synced_at = 0
        self._wake = threading.Event()
        self._done = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Any] = []
        if total > SYNC_EVERY:
            self._thread = threading.Thread(target=self._sync_loop, name="checkpoint-writeback", daemon=True)
            self._thread.start()
            self._pool = ThreadPoolExecutor(max_workers=1)

    def _sync_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._done:
                return
            try:
                os.fdatasync(self.fd)
            except OSError as e:  # reported by close(); the final fsync would hit it too
                self._error = e
                return

    def _hash(self, piece: memoryview, also: tuple[Any, ...]) -> None:
        self.hasher.update(piece)
        for h in also:
            h.update(piece)

    def write(self, data: memoryview, *also: Any) -> None:
        for start in range(0, len(data), CHUNK):
            piece = data[start : start + CHUNK]
            if self._pool is None:
                self._hash(piece, also)
            else:  # one worker: the pieces are hashed in order, while this thread writes
                self._pending.append(self._pool.submit(self._hash, piece, also))
            _write_all(self.fd, piece)
            self.written += len(piece)
            if self._thread is not None and self.written - self._synced_at >= SYNC_EVERY:
                self._synced_at = self.written
                self._wake.set()

    def _hashed(self) -> None:
        """Wait until every piece written so far is hashed (before reading an extra hasher)."""
        for f in self._pending:
            f.result()
        self._pending.clear()

    def close(self, *, fsync: bool, ok: bool) -> dict[str, Any]:
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                if ok:
                    self._hashed()
            if self._thread is not None:
                self._done = True
                self._wake.set()
                self._thread.join()
            if ok and self._error is not None:
                raise self._error
            if ok and fsync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
        return {"bytes": self.written, self.algorithm: str(self.hasher.hexdigest())}


def _bytes_of(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def write_blob(path: Path, data: bytes, algorithm: str, *, fsync: bool = False) -> dict[str, Any]:
    """Write ``data`` to ``path``, hashing it on the way.  Returns ``{"bytes": n, algorithm: hex}``."""
    w = _Writer(path, algorithm, len(data))
    ok = False
    try:
        w.write(memoryview(data))
        ok = True
    finally:
        entry = w.close(fsync=fsync, ok=ok)
    return entry


def write_safetensors(
    path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None, algorithm: str, *, fsync: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """Stream ``arrays`` (C-contiguous, native byte order, dtypes of :data:`ST_CODES`) into a safetensors file.

    Returns:
        (``{"bytes": n, algorithm: file digest}``, {tensor name: digest of its bytes}).
    """
    prefix, layout = safetensors_prefix({n: (a.dtype.name, a.shape) for n, a in arrays.items()}, metadata)
    w = _Writer(path, algorithm, len(prefix) + (layout[-1][2] if layout else 0))
    hashers: dict[str, Any] = {}
    ok = False
    try:
        w.write(memoryview(prefix))
        for name, _begin, _end in layout:
            hashers[name] = new_hash(algorithm)
            w.write(_bytes_of(arrays[name]), hashers[name])
        ok = True
    finally:
        entry = w.close(fsync=fsync, ok=ok)
    return entry, {name: str(h.hexdigest()) for name, h in hashers.items()}


def read_hashed(path: Path, algorithm: str) -> tuple[np.ndarray, str]:
    """A whole file in one new uint8 buffer, and its digest, hashed on a thread while reading.

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = np.empty(size, np.uint8)
        mv = memoryview(buf)
        hasher = new_hash(algorithm)
        if size <= CHUNK:
            n = fh.readinto(mv) or 0
            hasher.update(mv[:n])
            return buf[:n], str(hasher.hexdigest())
        with ThreadPoolExecutor(max_workers=1) as pool:  # FIFO: the pieces are hashed in order
            pending = []
            off = 0
            while off < size:
                n = fh.readinto(mv[off : off + CHUNK])
                if not n:
                    break  # the file shrank since fstat: the size check will say so
                pending.append(pool.submit(hasher.update, mv[off : off + n]))
                off += n
            for f in pending:
                f.result()
        return buf[:off], str(hasher.hexdigest())


def views(
    buf: np.ndarray, tensors: Mapping[str, tuple[str, list[int]]], metadata: Mapping[str, str] | None
) -> dict[str, np.ndarray] | None:
    """The tensors of a safetensors file in ``buf`` as views of it, if its header is the expected one.

    Args:
        buf: the whole file (as :func:`read_hashed` returns it).
        tensors: name -> (numpy dtype name, shape) the file must hold, exactly.
        metadata: the ``__metadata__`` it must have.

    Returns:
        name -> array (a view of ``buf``; native byte order), or None when the file does not
        begin with exactly the header :func:`safetensors_prefix` writes for ``tensors`` and
        ``metadata``, or its size does not match (then parse it another way to say why).
    """
    if any(dt not in ST_CODES for dt, _shape in tensors.values()):
        return None
    prefix, layout = safetensors_prefix(tensors, metadata)
    data_len = layout[-1][2] if layout else 0
    if len(buf) != len(prefix) + data_len or buf[: len(prefix)].tobytes() != prefix:
        return None
    out: dict[str, np.ndarray] = {}
    start = len(prefix)
    for name, begin, end in layout:
        dtype_name, shape = tensors[name]
        dtype = np.dtype(dtype_name).newbyteorder("<")
        a = buf[start + begin : start + end].view(dtype).reshape(shape)
        out[name] = a if a.dtype.isnative else a.astype(dtype.newbyteorder("="))
    return {n: out[n] for n in tensors}
