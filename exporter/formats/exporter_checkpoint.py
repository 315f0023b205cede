"""exporter training checkpoints (``python -m exporter train``): delegated to :mod:`exporter.checkpoint`.

A checkpoint directory (its newest valid step is used, newer damaged ones are warned
about) or one ``step-NNNNNNNN`` directory; the state is the step's canonical ``model``
group.  :func:`exporter.checkpoint.model_checkpoint` reads each file of the step once and
checks it against the digest its manifest records while loading (BLAKE3 for checkpoints
of format 3, sha256 for older ones), so the content hash reported here is the sha256 of
that step's ``manifest.json`` (which pins every file's digest: a provenance value users
can check with ``sha256sum``, whatever hash the checkpoint uses inside), the path is the
step directory, and the metadata is the run's ``model``,
``framework`` and ``step`` from the manifest.  Read-only (``exporter train`` writes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from exporter.errors import StateFileError
from exporter.formats import _common as C
from exporter.hashing import sha256_bytes

NAME = "exporter-checkpoint"
DTYPES = C.COMMON  # what exporter.checkpoint stores (each group is a safetensors file; no bfloat16)
SUFFIXES: tuple[str, ...] = ()


def sniff(src: C.Source) -> bool:
    if not src.is_dir:
        return False
    from exporter import checkpoint

    return checkpoint.is_checkpoint(src.path)


def read(src: C.Source, *, digest: bool) -> C.Read:
    from exporter import checkpoint

    ckpt = checkpoint.model_checkpoint(src.path, model=None)
    step = Path(ckpt.path)
    arrays = ckpt.group("model")
    # what the manifest records about the run: the export path checks "model" against its own
    meta = {"model": ckpt.model, "framework": ckpt.framework, "step": str(ckpt.step)}
    if not digest:
        return C.Read(step, arrays, meta, "")
    # exporter.checkpoint keeps the parsed manifest, not its bytes: read them once more
    # (a small file) and make sure they are the manifest that was verified.
    mpath = step / checkpoint.MANIFEST
    try:
        data = mpath.read_bytes()
    except OSError as e:
        raise StateFileError(f"{mpath}: cannot be read ({e}); check its permissions") from e
    try:
        same = json.loads(data) == ckpt.manifest
    except ValueError:
        same = False
    if not same:
        raise StateFileError(f"{mpath}: changed while the checkpoint was being read; read it again once training has committed")
    return C.Read(step, arrays, meta, sha256_bytes(data))


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    got = read(C.Source.probe(path), digest=False)
    return C.checked(got.path, got.arrays), got.metadata
