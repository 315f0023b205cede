"""torch.distributed.checkpoint (DCP) directories written outside exporter.  Read-only.

Either kind that :mod:`exporter.sharded` recognises: ``dcp.save``'s default layout
(``*.distcp`` + ``.metadata``) or ``HuggingFaceStorageWriter(save_distributed=True)``'s
safetensors shards with ``DCP_SHARDING_INFO``.  The state is the model part
(:func:`exporter.sharded.model_names`: the ``"model"`` entry of a
``{"model": ..., "optimizer": ...}`` state dict, without its prefix, else every tensor),
consolidated from the shards by DCP itself, a batch of tensors at a time, into arrays
allocated once.  Non-tensor entries are skipped.

The ``.metadata`` of the default layout is a pickle: DCP's ``FileSystemReader`` unpickles
it (exporter never does), so read such a directory only if you trust whoever wrote it, as
you would a ``torch.load`` without ``weights_only``.  The safetensors layout holds no pickle.

The content hash is :func:`exporter.hashing.sha256_tree` of the directory (a second pass
over the bytes: DCP reads its own files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporter import sharded
from exporter.errors import StateFileError
from exporter.formats import _common as C
from exporter.hashing import sha256_tree

NAME = "dcp"
DTYPES = C.ALL_DTYPES
SUFFIXES: tuple[str, ...] = ()


def sniff(src: C.Source) -> bool:
    return src.is_dir and sharded.dcp_kind(src.path) is not None


def _model(p: Path) -> tuple[dict[str, str], dict[str, sharded.DcpTensor]]:
    tensors = sharded.dcp_tensors(p)
    names = sharded.model_names(tensors)
    if not names:
        raise StateFileError(f"{p}: the DCP checkpoint holds no tensors (only non-tensor entries); nothing to export")
    bad = [f"tensor {n!r}: dtype {tensors[k].dtype} is not a tensor dtype exporter reads" for n, k in names.items() if tensors[k].dtype not in DTYPES]
    if bad:
        raise StateFileError.listing(
            f"{p}: holds tensors exporter cannot use (supported dtypes: {', '.join(sorted(DTYPES))}); convert them and save again",
            bad,
        )
    return names, tensors


def _tree_sha(p: Path) -> str:
    try:
        return sha256_tree(p)
    except OSError as e:
        raise StateFileError(f"{p}: cannot be read for hashing ({e}); check its permissions") from e


def read(src: C.Source, *, digest: bool) -> C.Read:
    p = src.path
    names, _ = _model(p)
    arrays = sharded.read_dcp(p, names)
    return C.Read(p, arrays, {}, _tree_sha(p) if digest else "")


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    got = read(C.Source.probe(path), digest=False)
    return C.checked(got.path, got.arrays), got.metadata


def describe(path: Path) -> C.StateInfo:
    """From DCP's metadata alone (no tensor is read), plus the tree hash."""
    p = C.existing(path)
    names, tensors = _model(p)
    infos = [C.TensorInfo(n, tensors[k].dtype, tensors[k].shape, tensors[k].nbytes) for n, k in names.items()]
    return C.state_info(p, NAME, infos, _tree_sha(p), {})
