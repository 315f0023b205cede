"""The writer of the checkpoint manifests exporter wrote before format 3, kept only for tests.

Format 1 (single process) and 2 (sharded) manifests hold sha256 digests under ``"sha256"``
keys, a ``manifest_sha256`` self-hash and no ``"hash"`` entry; format 1 has no ``layout``.
:func:`to_legacy` rewrites a step directory written by today's exporter into that form,
with the sha256 of the very same bytes, so tests can prove such checkpoints still load
and still have their damage found.  (``checkpoint-v1`` is one written by the old code itself.)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_legacy(step_dir: Path) -> dict:
    """Rewrite ``step_dir/manifest.json`` as format 1 (``layout`` "files") or 2 (sharded); returns it."""
    from safetensors.numpy import load as st_load

    m = json.loads((step_dir / "manifest.json").read_text())
    assert m["format_version"] == 3 and m["hash"] == "blake3", m
    sharded = m["layout"] != "files"
    old = {k: v for k, v in m.items() if k not in ("hash", "manifest_blake3")}
    if not sharded:
        del old["layout"]
    old["format_version"] = 2 if sharded else 1
    old["files"] = {n: {"bytes": e["bytes"], "sha256": _sha256((step_dir / n).read_bytes())} for n, e in m["files"].items()}
    if not sharded:
        old["tensors"] = {}
        for fname, entries in m["tensors"].items():
            arrays = st_load((step_dir / fname).read_bytes())
            old["tensors"][fname] = {
                n: {"dtype": e["dtype"], "shape": e["shape"], "sha256": _sha256(np.ascontiguousarray(arrays[n]).tobytes())}
                for n, e in entries.items()
            }
    body = json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    old["manifest_sha256"] = _sha256(body)
    (step_dir / "manifest.json").write_text(json.dumps(old, indent=1, sort_keys=True))
    return old
