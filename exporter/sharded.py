"""Read sharded checkpoints through their own engines: torch DCP and orbax, one tensor batch at a time.

Two kinds of directory written by ``torch.distributed.checkpoint`` (DCP) are recognised
from their contents:

* ``"torch_save"``: the default ``FileSystemWriter`` (``dcp.save(state, checkpoint_id=DIR)``):
  ``__<rank>_<n>.distcp`` files plus a ``.metadata`` file.  That ``.metadata`` is a pickle
  that torch writes and that only DCP's own ``FileSystemReader`` reads (it unpickles it, as
  ``torch.load`` without ``weights_only`` would): read such a directory only when you trust
  whoever wrote it.  exporter never unpickles anything itself.
* ``"safetensors"``: ``HuggingFaceStorageWriter(save_distributed=True)``: one safetensors
  file per rank whose header metadata holds ``DCP_SHARDING_INFO`` (each chunk's offsets in
  the full tensor).  No pickle anywhere; this is what exporter's distributed training
  writes (:mod:`exporter.distributed`), read back with ``HuggingFaceStorageReader``.

:func:`read_dcp` consolidates the full tensors with ``dcp.load(..., no_dist=True)`` into
arrays allocated once, a batch of about :data:`BATCH_BYTES` at a time, so that the bytes
held besides the result stay around one batch (shard files are closed, and their mapped
pages released, after each batch).

orbax directories are restored with orbax itself (:func:`read_orbax`), every array as a
host numpy array whatever the sharding it was saved with.

Lower layer: imports only ``exporter.deps``, ``exporter.errors`` (and numpy); never
``exporter.formats`` or ``exporter.checkpoint``, which both use it.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter.deps import require
from exporter.errors import StateFileError

__all__ = [
    "BATCH_BYTES",
    "DCP_METADATA",
    "DCP_SHARDING_KEY",
    "DcpTensor",
    "dcp_kind",
    "dcp_tensors",
    "model_names",
    "iter_dcp",
    "read_dcp",
    "read_orbax",
    "flatten",
]

DCP_METADATA = ".metadata"
DCP_SHARDING_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY
BATCH_BYTES = 64 << 20
_HEADER_LIMIT = 100_000_000


@dataclass(frozen=True)
class DcpTensor:
    """One tensor of a DCP checkpoint: its flattened key, numpy dtype name, full shape and state-dict path."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    path: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _np_dtype(self.dtype).itemsize


def _safetensors_meta(f: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file's header, or None when it is not one."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > _HEADER_LIMIT:
                return None
            doc = json.loads(fh.read(n))
    except (OSError, ValueError):
        return None
    meta = doc.get("__metadata__") if isinstance(doc, dict) else None
    return meta if isinstance(meta, dict) else {}


def dcp_kind(d: Path) -> str | None:
    """``"torch_save"``, ``"safetensors"`` (see the module docstring), or None: not a DCP directory.

    Cheap: lists the directory and reads at most one safetensors header; imports nothing.
    """
    if not d.is_dir():
        return None
    files = [c for c in d.iterdir() if c.is_file()]
    if (d / DCP_METADATA).is_file() and any(c.suffix == ".distcp" for c in files):
        return "torch_save"
    if any(c.name.endswith(".index.json") for c in files):
        return None  # a Hugging Face sharded checkpoint (also what DCP's consolidation writes)
    shards = sorted(c for c in files if c.suffix == ".safetensors")
    if shards and DCP_SHARDING_KEY in (_safetensors_meta(shards[0]) or {}):
        return "safetensors"
    return None


def _dcp(purpose: str) -> tuple[Any, Any]:
    torch = require("torch", purpose)
    dcp = require("torch.distributed.checkpoint", purpose)
    return torch, dcp


def _reader(d: Path, kind: str, dcp: Any) -> Any:
    if kind == "safetensors":
        return dcp.HuggingFaceStorageReader(str(d))
    return dcp.FileSystemReader(str(d))


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # a dependency of onnx, always present

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _unreadable(d: Path, e: Exception) -> StateFileError:
    lines = str(e).strip().splitlines()
    return StateFileError(
        f"{d}: not a readable torch.distributed.checkpoint directory ({type(e).__name__}: "
        f"{lines[0][:300] if lines else ''}); it is incomplete or corrupt: save it again"
    )


def dcp_tensors(d: Path) -> dict[str, DcpTensor]:
    """The tensors a DCP directory holds (non-tensor entries are skipped), by flattened key.

    Raises:
        StateFileError: not a DCP directory, or its metadata cannot be read.
        MissingDependencyError: torch is not installed.
    """
    kind = dcp_kind(d)
    if kind is None:
        raise StateFileError(f"{d}: not a torch.distributed.checkpoint directory (no .metadata with .distcp files, no DCP safetensors shards)")
    _torch, dcp = _dcp(f"reading {d} (a torch.distributed.checkpoint directory)")
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = _reader(d, kind, dcp).read_metadata()
    except Exception as e:  # torch/safetensors raise many types on damaged files
        raise _unreadable(d, e) from e
    paths = getattr(meta, "planner_data", None) or {}
    out: dict[str, DcpTensor] = {}
    for key, md in meta.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        dtype = str(md.properties.dtype).removeprefix("torch.")
        path = paths.get(key)
        parts = tuple(str(p) for p in path) if isinstance(path, (tuple, list)) and path else tuple(key.split(".", 1))
        out[key] = DcpTensor(key, dtype, tuple(int(s) for s in md.size), parts)
    return out


def model_names(tensors: Mapping[str, DcpTensor]) -> dict[str, str]:
    """Output name -> DCP key of the model part of a plain DCP state dict.

    When the top level of the saved state dict holds a ``"model"`` entry (the
    ``{"model": ..., "optimizer": ...}`` layout of the DCP tutorials and of exporter's own
    steps), only that entry is the model, named without the ``model.`` prefix; otherwise
    every tensor is, named by its key.
    """
    under = {k: t for k, t in tensors.items() if t.path[0] == "model" and len(t.path) > 1}
    if under:
        return {".".join(t.path[1:]): k for k, t in sorted(under.items())}
    return {k: k for k in sorted(tensors)}


def _target(t: DcpTensor, torch: Any) -> tuple[np.ndarray, Any]:
    arr = np.empty(t.shape, dtype=_np_dtype(t.dtype))
    if t.dtype == "bfloat16":
        return arr, torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return arr, torch.from_numpy(arr)


def iter_dcp(d: Path, names: Mapping[str, str] | None = None, *, batch_bytes: int = BATCH_BYTES) -> Iterator[dict[str, np.ndarray]]:
    """Full tensors of a DCP directory, consolidated a batch at a time (see :func:`read_dcp`).

    Yields:
        name -> array dicts of about ``batch_bytes`` each (one tensor at least), in ``names`` order.
    """
    tensors = dcp_tensors(d)
    if names is None:
        names = model_names(tensors)
    missing = sorted(k for k in names.values() if k not in tensors)
    if missing:
        raise StateFileError.listing(
            f"{d}: the DCP checkpoint lacks tensors that were asked for; it is incomplete", [f"missing {k!r}" for k in missing]
        )
    torch, dcp = _dcp(f"reading {d} (a torch.distributed.checkpoint directory)")
    kind = dcp_kind(d)
    assert kind is not None
    arrays: dict[str, np.ndarray] = {}
    targets: dict[str, Any] = {}

    def load() -> dict[str, np.ndarray]:
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(targets, storage_reader=_reader(d, kind, dcp), no_dist=True)
        except Exception as e:  # damaged shard files surface as many exception types
            raise _unreadable(d, e) from e
        got = dict(arrays)
        arrays.clear()
        targets.clear()
        return got

    for name, key in names.items():
        arr, target = _target(tensors[key], torch)
        arrays[name] = arr
        targets[key] = target
        if sum(a.nbytes for a in arrays.values()) >= batch_bytes:
            yield load()
    if targets:
        yield load()


def read_dcp(d: Path, names: Mapping[str, str] | None = None, *, batch_bytes: int = BATCH_BYTES) -> dict[str, np.ndarray]:
    """Consolidate full tensors of a DCP directory into numpy arrays.

    Each array is allocated once and filled in place by ``dcp.load(..., no_dist=True)``,
    about ``batch_bytes`` at a time, so that little besides the result is held at once.

    Args:
        d: the DCP directory (either kind).
        names: output name -> DCP key to read (default: :func:`model_names`).
        batch_bytes: bytes per ``dcp.load`` call (one tensor at least).

    Returns:
        name -> array (C-contiguous, native byte order, writeable), in ``names`` order.

    Raises:
        StateFileError: not a DCP directory, a key it does not hold, or a damaged file.
        MissingDependencyError: torch is not installed.
    """
    out: dict[str, np.ndarray] = {}
    for batch in iter_dcp(d, names, batch_bytes=batch_bytes):
        out.update(batch)
    return out


# --------------------------------------------------------------------------------------
# orbax
# --------------------------------------------------------------------------------------
def read_orbax(item: Path) -> Any:
    """Restore one orbax item directory as a tree of host numpy arrays (any saved sharding).

    Raises:
        StateFileError: orbax cannot read it (incomplete or corrupt).
        MissingDependencyError: jax/orbax are not installed.
    """
    jax = require("jax", f"reading {item} (an orbax checkpoint)")
    ocp = require("orbax.checkpoint", f"reading {item} (an orbax checkpoint)")
    item = item.resolve()  # orbax misreads relative paths
    try:
        ckptr = ocp.PyTreeCheckpointer()
        meta = ckptr.metadata(item)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)

        def restore_arg(m: Any) -> Any:
            if type(m).__name__ == "ArrayMetadata":
                return ocp.RestoreArgs(restore_type=np.ndarray)
            return ocp.RestoreArgs()

        args = jax.tree_util.tree_map(restore_arg, tree)
        return ckptr.restore(item, args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:  # orbax/tensorstore errors on a damaged directory
        lines = str(e).strip().splitlines()
        raise StateFileError(
            f"{item}: not a readable orbax checkpoint ({type(e).__name__}: {lines[0][:300] if lines else ''}); "
            "it is incomplete or corrupt: save it again"
        ) from e


def flatten(tree: Any, prefix: str = "", leaf: Callable[[Any], Any] = np.asarray) -> dict[str, Any]:
    """A nested mapping of arrays (exporter's own orbax trees) as ``"a/b/c"`` keys, each leaf as ``leaf(x)``."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k), leaf))
    else:
        out[prefix] = leaf(tree)
    return out
