"""Saved state <-> ``dict[str, np.ndarray]``; the format is sniffed from the bytes, never the extension.

Formats (R = read, W = write) and the dtypes each one stores bit-exactly; each is one
module of :mod:`exporter.formats`:

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
    exporter-checkpoint  R    exporter.checkpoint.is_checkpoint  common (delegated to exporter.checkpoint)

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
* :func:`read_state` reads, hashes and parses in one pass: a file is read once into
  memory, then sniffed, hashed and parsed from that buffer.
* ``save_state`` accepts a flat or nested mapping of arrays (numpy, torch tensors, jax
  arrays); tree formats (msgpack, orbax) store ``"a/b/c"`` keys as nested dicts, so the
  round trip returns the same flat keys.  Every write is atomic (``exporter.atomic``).
* Every problem with a file a user gives us is a ``StateFileError`` naming the file, what is
  wrong and how to fix it; an impossible request (a dtype a format cannot hold, an unknown
  format name) is a ``UsageError``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter import formats, hashing
from exporter.errors import StateFileError, UsageError
from exporter.formats import _common, npy
from exporter.formats import safetensors as _safetensors
from exporter.formats._common import CONTAINER_KEY as _CONTAINER_KEY
from exporter.formats._common import NPZ_MARKER as _NPZ_MARKER
from exporter.formats._common import StateInfo, TensorInfo

__all__ = [
    "FORMATS",
    "WRITE_FORMATS",
    "FORMAT_DTYPES",
    "TensorInfo",
    "StateInfo",
    "LoadedState",
    "sniff",
    "read_state",
    "load_state",
    "save_state",
    "inspect_state",
    "sha256_path",
    "save_arrays",
    "load_arrays",
]

FORMATS: tuple[str, ...] = formats.FORMATS
WRITE_FORMATS: tuple[str, ...] = formats.WRITE_FORMATS
FORMAT_DTYPES: Mapping[str, frozenset[str]] = formats.FORMAT_DTYPES
ST_MAX_HEADER = _safetensors.MAX_HEADER  # the safetensors reference implementation's limit


@dataclass(frozen=True)
class LoadedState:
    """A saved state read, hashed and parsed in one pass (see :func:`read_state`).

    Attributes:
        path: the file or directory read (for an exporter training checkpoint: the step
            directory whose model state this is).
        format: one of :data:`FORMATS`.
        arrays: ``{name: array}``, as :func:`load_state` returns it.
        sha256: the content hash, the value :func:`inspect_state` reports (a file's
            sha256; a directory tree's; an HF index plus its shards; the step's
            ``manifest.json`` for an exporter checkpoint).
        metadata: ``str -> str`` stored with the state (safetensors header metadata,
            an HF index's ``metadata``), else empty.
    """

    path: Path
    format: str
    arrays: dict[str, np.ndarray]
    sha256: str
    metadata: dict[str, str]


def _check_format(format: str | None) -> None:
    if format is not None:
        formats.module(format)


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
    return formats.sniff(formats.Source.probe(path))


def read_state(path: str | os.PathLike[str], *, format: str | None = None) -> LoadedState:
    """Read, hash and parse saved state in one pass over its bytes.

    A file (safetensors, torch, npz, npy, flax-msgpack) is opened once and read into
    memory; it is sniffed, hashed and parsed from that buffer (safetensors tensors are
    views of it).  An HF sharded checkpoint reads its index and each shard once, hashing
    each from the bytes it parses.  orbax reads its own files, which are then hashed as a
    tree.  An exporter training checkpoint is read by ``exporter.checkpoint``, which
    verifies every file's sha256 while loading; ``sha256`` is then that of the step's
    ``manifest.json``.

    Args:
        path: as for :func:`load_state`.
        format: as for :func:`load_state`.

    Returns:
        A :class:`LoadedState`; ``arrays`` equal :func:`load_state`'s, ``sha256`` equals
        :func:`inspect_state`'s (for a file: :func:`sha256_path`'s).

    Raises:
        StateFileError: as :func:`load_state` (a damaged training checkpoint:
            CheckpointCorruptError, which is one).
        CheckpointError: a directory of step directories with no valid one.
        MissingDependencyError: reading needs torch or jax/flax/orbax and it is missing.
        UsageError: an unknown ``format`` name.
    """
    _check_format(format)
    src = formats.Source.load(path)
    fmt = formats.resolve(src, format)
    got = formats.read(src, fmt, digest=True)
    return LoadedState(path=got.path, format=fmt, arrays=got.arrays, sha256=got.sha256, metadata=got.metadata)


def _load(path: str | os.PathLike[str], format: str | None) -> formats.Read:
    # Only probed: a format that streams (torch, npz, npy) then reads the file itself,
    # without a copy of the whole file in memory; the others read it once in full.
    _check_format(format)
    src = formats.Source.probe(path)
    return formats.read(src, formats.resolve(src, format), digest=False)


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
    return _load(path, format).arrays


def _write_format(p: Path, format: str | None, allowed: tuple[str, ...]) -> str:
    if format is not None:
        if format not in allowed:
            raise UsageError(f"cannot write format {format!r}; writable formats: {', '.join(allowed)}")
        return format
    fmt = formats.suffix_format(p.suffix) or "safetensors"
    if fmt == "hf-sharded":
        raise UsageError(f"{p}: Hugging Face sharded checkpoints are read-only here; write a .safetensors file instead")
    if fmt == "npy" and "npy" not in allowed:
        raise UsageError(f"{p}: .npy holds a single array, not named state; use save_arrays(array, path) or a .safetensors/.npz path")
    if fmt not in allowed:
        raise UsageError(f"{p}: cannot write {fmt} here; use one of {', '.join(allowed)} (format=...)")
    return fmt


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
            got = _common.to_numpy(v)
            if isinstance(got, str):
                problems.append(f"tensor {name!r}: {got}")
            elif name in out:
                problems.append(f"tensor {name!r}: given twice (nested and as a '/'-joined key)")
            else:
                out[name] = got

    walk(state, "")
    if problems:
        raise UsageError.listing(f"{what} cannot be saved", problems)
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
    formats.save(fmt, _collect(state, f"{p}: state", nested=True), p, metadata)
    return p


def sha256_path(path: str | os.PathLike[str]) -> str:
    """:func:`exporter.hashing.sha256_path`, with a StateFileError naming a missing or unreadable path.

    A directory hashes, in sorted order of relative POSIX path, one line
    ``"<relative path>\\0<file sha256>\\n"`` per regular file (symlinked directories are
    not followed).

    Raises:
        StateFileError: the path does not exist or cannot be read.
    """
    p = _common.existing(path)
    try:
        return hashing.sha256_path(p)
    except OSError as e:
        raise StateFileError(f"{path}: cannot be read for hashing ({e}); check its permissions") from e


def inspect_state(path: str | os.PathLike[str], *, format: str | None = None) -> StateInfo:
    """Describe saved state without converting it: format, tensors, sizes and a content hash.

    safetensors files (and safetensors shards) are described from their header alone.

    Args:
        path: as for :func:`load_state`.
        format: as for :func:`load_state`.

    Returns:
        A :class:`StateInfo`; ``sha256`` is :func:`read_state`'s: it covers the file, the
        directory tree, (HF sharded) the index plus its shards, or (exporter checkpoint)
        the step's manifest, and ``path`` is the step directory.

    Raises:
        StateFileError: as :func:`load_state`.
    """
    _check_format(format)
    src = formats.Source.probe(path)
    return formats.describe(src, formats.resolve(src, format))


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
    fmt = _write_format(p, format, ("safetensors", "npz", "npy"))
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
        problems = _common.file_target(p) + [
            f"tensor 'array': dtype {a.dtype.name} cannot be stored in npy (it holds: {', '.join(sorted(npy.DTYPES))})"
            for a in arrays.values()
            if a.dtype.name not in npy.DTYPES
        ]
        if problems:
            raise UsageError.listing(f"{p}: cannot save this array as npy; pick another format or convert it", problems)
        with _common.writing(p):
            npy.save_array(arrays["array"], p)
    elif fmt == "safetensors":
        formats.save(fmt, arrays, p, {_CONTAINER_KEY: kind})
    else:
        marker = {_NPZ_MARKER: np.frombuffer(kind.encode("ascii"), dtype=np.uint8).copy()} if kind != "dict" else {}
        formats.save(fmt, {**arrays, **marker}, p, None)
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
    got = _load(path, None)
    arrays = got.arrays
    kind = got.metadata.get(_CONTAINER_KEY, "dict")
    if kind == "dict":
        return arrays
    if kind == "array" and set(arrays) == {"array"}:
        return arrays["array"]
    if kind == "list" and set(arrays) == {str(i) for i in range(len(arrays))}:
        return [arrays[str(i)] for i in range(len(arrays))]
    raise StateFileError(
        f"{got.path}: marked as container {kind!r} but holds keys {sorted(arrays)[:5]}; the file was altered: re-save it "
        "with save_arrays"
    )
