"""Hugging Face sharded checkpoints: ``model.safetensors.index.json`` (or
``pytorch_model.bin.index.json``) = ``{"metadata": {...}, "weight_map": {tensor: shard}}``
beside shards in safetensors or torch format.  Read-only.

The path may be the directory or the index file.  Every shard is read once: its bytes are
hashed and parsed from the same buffer.  The content hash covers the index and the shards
only (``sha256_entries`` over ``(file name, file sha256)``, sorted by name), so a changed
``config.json`` beside them does not change it.  The index must agree with the shards:
every tensor in exactly one shard, the one the index names.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from exporter.errors import StateFileError
from exporter.formats import _common as C
from exporter.formats import safetensors, torch_pt
from exporter.hashing import sha256_entries

NAME = "hf-sharded"
DTYPES = C.COMMON | {"bfloat16", "complex128"}  # as its shards: safetensors or torch
SUFFIXES = (".json",)
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WHAT = "Hugging Face index"


def index_in(d: Path) -> Path | None:
    for name in _INDEX_NAMES:
        if (d / name).is_file():
            return d / name
    found = sorted(d.glob("*.index.json"))
    return found[0] if len(found) == 1 else None


def looks_json(src: C.Source) -> bool:
    return not src.is_dir and src.head.lstrip()[:1] == b"{"


def sniff(src: C.Source) -> bool:
    if src.is_dir:
        return index_in(src.path) is not None
    if not looks_json(src):
        return False
    doc = src.json("JSON file")
    return isinstance(doc, dict) and "weight_map" in doc


def _index(src: C.Source) -> tuple[C.Source, dict[str, str], dict[str, Path], dict[str, str]]:
    """Validate an index: returns (index source, weight_map, shard name -> path, metadata)."""
    if src.is_dir:
        found = index_in(src.path)
        assert found is not None, src.path  # sniffed as hf-sharded
        src = C.Source.load(found)
    idx = src.path
    doc = src.json(_WHAT)
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise StateFileError(f"{idx}: 'weight_map' must map tensor names to shard file names; {C.RESAVE}")
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
        raise StateFileError.listing(f"{idx}: Hugging Face index names shards that cannot be used; download or restore them", problems)
    return src, wmap, shards, meta


def _check_keys(idx: Path, wmap: dict[str, str], shard_keys: dict[str, list[str]]) -> None:
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
        raise StateFileError.listing(f"{idx}: index and shards disagree; the checkpoint is inconsistent, re-download or re-save it", problems)


def _shard_format(idx: Path, s: C.Source) -> str:
    if s.size == 0:
        raise StateFileError(f"{s.path}: shard of {idx} is empty (0 bytes); {C.RESAVE}")
    for mod in (safetensors, torch_pt):
        if mod.sniff(s):
            return mod.NAME
    raise StateFileError(f"{s.path}: shard of {idx} is neither a safetensors nor a torch file; {C.RESAVE}")


def _digest(idx_src: C.Source, shard_sha: dict[str, str]) -> str:
    return sha256_entries(sorted([(idx_src.path.name, idx_src.sha256()), *shard_sha.items()]))


def read(src: C.Source, *, digest: bool) -> C.Read:
    idx_src, wmap, shards, meta = _index(src)
    loaded: dict[str, dict[str, np.ndarray]] = {}
    sha: dict[str, str] = {}
    for name, sp in shards.items():
        s = C.Source.load(sp) if digest else C.Source.probe(sp)  # hashing needs the bytes in memory anyway
        mod = safetensors if _shard_format(idx_src.path, s) == safetensors.NAME else torch_pt
        got = mod.read(s, digest=digest)
        loaded[name], sha[name] = got.arrays, got.sha256
    _check_keys(idx_src.path, wmap, {n: list(a) for n, a in loaded.items()})
    out: dict[str, np.ndarray] = {}
    for arrays in loaded.values():
        out.update(arrays)
    return C.Read(src.path, out, meta, _digest(idx_src, sha) if digest else "")


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    got = read(C.Source.probe(path), digest=False)
    return C.checked(got.path, got.arrays), got.metadata


def describe(path: Path) -> C.StateInfo:
    """safetensors shards from their headers (each then hashed); torch shards are read."""
    src = C.Source.probe(path)
    idx_src, wmap, shards, meta = _index(src)
    infos: list[C.TensorInfo] = []
    keys: dict[str, list[str]] = {}
    sha: dict[str, str] = {}
    for name, sp in shards.items():
        s = C.Source.probe(sp)
        if _shard_format(idx_src.path, s) == safetensors.NAME:
            shard_info = safetensors.describe(sp)
            shard_tensors, sha[name] = list(shard_info.tensors), shard_info.sha256
        else:
            got = torch_pt.read(C.Source.load(sp), digest=True)
            shard_tensors, sha[name] = C.tensor_infos(C.checked(sp, got.arrays)), got.sha256
        infos += shard_tensors
        keys[name] = [t.name for t in shard_tensors]
    _check_keys(idx_src.path, wmap, keys)
    return C.state_info(src.path, NAME, infos, _digest(idx_src, sha), meta)
