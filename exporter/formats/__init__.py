"""Saved-state formats: one module each, dispatched through one table.

Every format module exposes the same small set:

    NAME          the format's name (one of :data:`FORMATS`)
    DTYPES        the dtype names it stores bit-exactly
    SUFFIXES      file suffixes that choose it when saving without ``format=``
    sniff(src)    recognise a :class:`~exporter.formats._common.Source` from its bytes or
                  directory contents (never from its name)
    read(src, *, digest)  -> Read(path, arrays, metadata, sha256): parse (and with
                  ``digest``, hash) in one pass over the bytes
    load(path)    -> (arrays, metadata)
    save(arrays, path, metadata), check_save(arrays, path, metadata) -> problems
                  where the format is writable
    describe(path) -> StateInfo, where that is cheaper than reading (safetensors: header only)

A new format is one new module beside these and one entry in :data:`MODULES`
(its place there is its place in the sniffing order).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType, ModuleType

import numpy as np

from exporter.errors import StateFileError, UsageError
from exporter.formats import (
    _common,
    dcp,
    exporter_checkpoint,
    hf_sharded,
    msgpack,
    npy,
    npz,
    orbax,
    safetensors,
    torch_pt,
)
from exporter.formats._common import ALL_DTYPES, RESAVE, Read, Source, StateInfo, TensorInfo

__all__ = [
    "MODULES",
    "FORMATS",
    "WRITE_FORMATS",
    "FORMAT_DTYPES",
    "ALL_DTYPES",
    "Read",
    "Source",
    "StateInfo",
    "TensorInfo",
    "module",
    "sniff",
    "resolve",
    "read",
    "describe",
    "save",
    "suffix_format",
]

#: name -> module, in the order :data:`FORMATS` lists them.
MODULES: Mapping[str, ModuleType] = MappingProxyType(
    {
        m.NAME: m
        for m in (safetensors, torch_pt, npz, npy, msgpack, orbax, hf_sharded, exporter_checkpoint, dcp)
    }
)
FORMATS: tuple[str, ...] = tuple(MODULES)
WRITE_FORMATS: tuple[str, ...] = tuple(n for n, m in MODULES.items() if hasattr(m, "save"))
FORMAT_DTYPES: Mapping[str, frozenset[str]] = MappingProxyType({n: m.DTYPES for n, m in MODULES.items()})

# Sniffing order.  Directories: an exporter checkpoint can also look like orbax, so it goes
# first.  Files: safetensors before torch, because a header length such as 0x0380 starts
# with 80 03, a pickle's protocol marker; the rest are disjoint (npy magic, zip, "{", msgpack map).
SNIFF_ORDER: tuple[str, ...] = (
    "exporter-checkpoint",
    "orbax",
    "dcp",
    "npy",
    "safetensors",
    "torch",
    "npz",
    "hf-sharded",
    "flax-msgpack",
)
assert set(SNIFF_ORDER) == set(FORMATS), "every format is sniffed"
assert ALL_DTYPES == frozenset().union(*FORMAT_DTYPES.values())

_SUFFIXES = {s: n for n, m in MODULES.items() for s in m.SUFFIXES}


def module(fmt: str) -> ModuleType:
    """The module of format ``fmt``; UsageError for an unknown name."""
    if fmt not in MODULES:
        raise UsageError(f"unknown state format {fmt!r}; known formats: {', '.join(FORMATS)}")
    return MODULES[fmt]


def suffix_format(suffix: str) -> str | None:
    """The format a file suffix (``".pt"``) chooses when saving, if any."""
    return _SUFFIXES.get(suffix.lower())


# ----------------------------------------------------------------------------- sniffing
def sniff(src: Source) -> str:
    """The format of ``src``, from its bytes or directory contents; StateFileError if none."""
    if not src.is_dir and src.size == 0:
        raise StateFileError(
            f"{src.path}: the file is empty (0 bytes); expected a saved state. It was probably not written completely: {RESAVE}"
        )
    for fmt in SNIFF_ORDER:
        if MODULES[fmt].sniff(src):
            return fmt
    raise _unrecognised(src)


def _unrecognised(src: Source) -> StateFileError:
    p = src.path
    if src.is_dir:
        files = sorted(c.name for c in p.iterdir() if c.is_file() and suffix_format(c.suffix) not in (None, "hf-sharded"))
        hint = f" It holds {', '.join(files[:5])}: pass one of those files instead." if files else ""
        return StateFileError(
            f"{p}: is a directory, but not a checkpoint directory exporter can read (expected a state file, an orbax "
            "checkpoint with _METADATA/_CHECKPOINT_METADATA, a Hugging Face sharded checkpoint with "
            f"model.safetensors.index.json, or an exporter checkpoint).{hint}"
        )
    if src.is_zip():
        other = sorted(n for n in src.zip_names() if not n.endswith(".npy"))[:3]
        return StateFileError(
            f"{p}: zip archive that is neither a torch file (no data.pkl) nor an .npz (entries other than .npy, e.g. "
            f"{', '.join(other)}); expected a state file: save one with exporter.state.save_state"
        )
    if hf_sharded.looks_json(src):
        return StateFileError(
            f"{p}: a JSON file but not a Hugging Face index (no 'weight_map'); pass the weights file "
            "(model.safetensors) or model.safetensors.index.json instead"
        )
    if src.size < 9:
        return StateFileError(f"{p}: only {src.size} bytes, too short to be any state format; the file is truncated: {RESAVE}")
    return StateFileError(
        f"{p}: not a known state format (first bytes {src.head[:8].hex(' ')}); expected safetensors, a torch .pt/.pth "
        "(zip), .npz, .npy, flax msgpack, a Hugging Face index (.index.json) or a checkpoint directory. "
        "Convert it with the framework that wrote it, e.g. safetensors.numpy.save_file(state, 'model.safetensors')"
    )


def resolve(src: Source, format: str | None) -> str:
    """The format to read ``src`` as: sniffed, and checked against ``format`` if given.

    A directory that several formats recognise (an exporter checkpoint stored with orbax)
    is read as ``format`` when that one recognises it too.
    """
    if format is not None:
        module(format)
    fmt = sniff(src)
    if format is not None and format != fmt:
        if src.is_dir and MODULES[format].sniff(src):
            return format
        raise StateFileError(
            f"{src.path}: holds {fmt} data, not {format}; drop format= (the format is read from the file's bytes, "
            "whatever its name)"
        )
    return fmt


# ----------------------------------------------------------------------------- reading
def read(src: Source, fmt: str, *, digest: bool) -> Read:
    """Read ``src`` as ``fmt``: arrays checked and normalised (native, C order, writeable)."""
    got = MODULES[fmt].read(src, digest=digest)
    assert not digest or got.sha256, fmt
    return got._replace(arrays=_common.checked(got.path, got.arrays))


def describe(src: Source, fmt: str) -> StateInfo:
    """What ``src`` holds: from the format's ``describe`` where it has one, else a hashed read."""
    mod = MODULES[fmt]
    if hasattr(mod, "describe"):
        return mod.describe(src.path)
    got = read(src, fmt, digest=True)
    return _common.state_info(got.path, fmt, _common.tensor_infos(got.arrays), got.sha256, got.metadata)


# ----------------------------------------------------------------------------- writing
def save(fmt: str, arrays: dict[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None) -> None:
    """Check that ``fmt`` can hold ``arrays`` (UsageError listing every problem), then write atomically."""
    mod = MODULES[fmt]
    problems = [
        f"tensor {k!r}: dtype {a.dtype.name} cannot be stored in {fmt} (it holds: {', '.join(sorted(mod.DTYPES))})"
        for k, a in arrays.items()
        if a.dtype.name not in mod.DTYPES
    ]
    problems += mod.check_save(arrays, path, metadata)
    if problems:
        raise UsageError.listing(f"{path}: cannot save this state as {fmt}; pick another format or convert the tensors", problems)
    with _common.writing(path):
        mod.save(arrays, path, metadata)
