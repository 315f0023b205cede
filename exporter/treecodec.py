"""Nested training state <-> (plain JSON document, flat tensors), without pickle.

Two codecs, both used by :mod:`exporter.checkpoint` writers (``state.json`` holds the
document, a ``<group>.safetensors`` file the tensors):

* :func:`encode_tree` / :func:`decode_tree`: arbitrary nested Python state (a torch
  ``optimizer.state_dict()``, an LR scheduler's, NumPy bit-generator states).  Containers
  and scalars become JSON; every tensor moves to ``tensors`` under its path and is referenced
  as ``{"__tensor__": key, "kind": ...}``.  Decoding rebuilds the exact structure (dict key
  types and order, tuples, numpy scalar types, torch dtypes and devices).
* :func:`flatten_pytree` / :func:`restore_pytree`: JAX pytrees (an optax state).  The
  structure is not stored as code: it is rebuilt from a template of the same kind
  (``optimizer.init(params)``) and checked leaf by leaf.

The document format is part of the checkpoint format (the same in ``format_version`` 1 and
3, which changed only the manifest's hash): change it only together with
:data:`exporter.checkpoint.FORMAT_VERSION`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from exporter.deps import require
from exporter.errors import CheckpointCorruptError, CheckpointError

__all__ = ["encode_tree", "decode_tree", "flatten_pytree", "restore_pytree"]

# torch dtypes numpy cannot hold: stored widened to float32 (exact) and narrowed back on decode.
_TORCH_WIDEN = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def _is_torch_tensor(obj: Any) -> bool:
    t = sys.modules.get("torch")  # a torch tensor can only exist once torch is imported
    return t is not None and isinstance(obj, t.Tensor)


def _is_jax_array(obj: Any) -> bool:
    j = sys.modules.get("jax")
    return j is not None and isinstance(obj, j.Array)


def encode_tree(obj: Any, tensors: dict[str, np.ndarray], prefix: str = "") -> Any:
    """Encode a nested state (e.g. ``optimizer.state_dict()``) as JSON, moving tensors out.

    Supports dicts (any int/str/float/bool/None keys, order kept), lists, tuples, None,
    bool, int, float (including nan/inf), str, numpy scalars and arrays, torch tensors
    (dtype and device recorded; bfloat16/float8 stored widened to float32, which is exact)
    and jax arrays.  Tensors are added to ``tensors`` under their path and referenced as
    ``{"__tensor__": key}``; :func:`decode_tree` rebuilds the exact structure.

    Args:
        obj: the state to encode.
        tensors: receives the tensors (key -> C-contiguous numpy copy).
        prefix: path prefix of the tensor keys (``"numpy/data"``).

    Returns:
        A JSON-serialisable document (``json.dumps(..., allow_nan=False)`` works).

    Raises:
        CheckpointError: a value or dict key of an unsupported type (names its path).
    """

    def key_of(path: str) -> str:
        k = path or "value"
        while k in tensors:
            k += "#"
        return k

    def enc(o: Any, path: str) -> Any:
        if o is None or isinstance(o, (bool, str)):
            return o
        if isinstance(o, int):
            return o
        if isinstance(o, float):
            return o if math.isfinite(o) else {"__float__": repr(o)}
        if isinstance(o, np.generic):
            return {"__scalar__": o.dtype.name, "value": enc(o.item(), path)}
        if isinstance(o, np.ndarray):
            k = key_of(path)
            tensors[k] = np.array(o, order="C", copy=True)
            return {"__tensor__": k, "kind": "numpy"}
        if _is_torch_tensor(o):
            t = o.detach()
            ref: dict[str, Any] = {"__tensor__": "", "kind": "torch", "device": str(t.device)}
            dt = str(t.dtype).removeprefix("torch.")
            if dt in _TORCH_WIDEN:
                ref["torch_dtype"] = dt
                t = t.float()
            k = key_of(path)
            ref["__tensor__"] = k
            tensors[k] = np.array(t.cpu().numpy(), order="C", copy=True)
            return ref
        if _is_jax_array(o):
            k = key_of(path)
            tensors[k] = np.array(o, order="C", copy=True)
            return {"__tensor__": k, "kind": "jax"}
        if isinstance(o, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(o)]
        if isinstance(o, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in o):
                return {k: enc(v, f"{path}/{k}" if path else k) for k, v in o.items()}
            items = []
            for k, v in o.items():
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise CheckpointError(
                        f"cannot store state at {path or '<root>'!r}: dict key {k!r} of type {type(k).__name__} "
                        "(dict keys must be str, int, float, bool or None)"
                    )
                items.append([enc(k, path), enc(v, f"{path}/{k}" if path else str(k))])
            return {"__dict__": items}
        raise CheckpointError(
            f"cannot store state at {path or '<root>'!r}: values of type {type(o).__module__}.{type(o).__name__} "
            "are not supported (use tensors, numbers, strings, lists, tuples and dicts)"
        )

    return enc(obj, prefix)


def decode_tree(doc: Any, tensors: Mapping[str, np.ndarray]) -> Any:
    """Inverse of :func:`encode_tree`.

    Args:
        doc: the document :func:`encode_tree` returned (after a JSON round trip).
        tensors: the tensors it moved out.

    Returns:
        The state: numpy arrays come back as numpy, torch tensors as torch tensors (dtype
        and device restored), jax arrays as jax arrays.

    Raises:
        CheckpointCorruptError: a referenced tensor is missing, or a reference has an
            unknown kind (a damaged or newer checkpoint).
        MissingDependencyError: the state holds torch/jax tensors and that framework is
            not installed.
    """

    def dec(o: Any) -> Any:
        if isinstance(o, list):
            return [dec(v) for v in o]
        if not isinstance(o, dict):
            return o
        if "__float__" in o:
            return float(o["__float__"])
        if "__scalar__" in o:
            return np.dtype(o["__scalar__"]).type(dec(o["value"]))
        if "__tuple__" in o:
            return tuple(dec(v) for v in o["__tuple__"])
        if "__dict__" in o:
            return {dec(k): dec(v) for k, v in o["__dict__"]}
        if "__tensor__" in o:
            return tensor(o)
        return {k: dec(v) for k, v in o.items()}

    def tensor(ref: Mapping[str, Any]) -> Any:
        key = ref["__tensor__"]
        if key not in tensors:
            raise CheckpointCorruptError(f"checkpoint state refers to tensor {key!r}, which is not stored")
        arr = tensors[key]
        kind = ref.get("kind", "numpy")
        if kind == "numpy":
            return np.array(arr)
        if kind == "jax":
            jnp = require("jax.numpy", "restoring JAX arrays from a checkpoint")
            return jnp.asarray(arr)
        if kind != "torch":
            raise CheckpointCorruptError(
                f"checkpoint state refers to tensor {key!r} of unknown kind {kind!r} (expected numpy, torch or "
                "jax); the checkpoint is damaged or was written by a newer exporter"
            )
        torch = require("torch", "restoring torch tensors from a checkpoint")
        t = torch.from_numpy(np.array(arr))
        if "torch_dtype" in ref:
            t = t.to(getattr(torch, ref["torch_dtype"]))
        device = ref.get("device", "cpu")
        if device != "cpu":
            t = t.to(device)
        return t

    return dec(doc)


def flatten_pytree(tree: Any, prefix: str = "") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Flatten a JAX pytree (e.g. an optax state) into (structure document, tensors).

    The document records the treedef (as text, for checking) and every leaf's path, dtype
    and shape; the tensors are keyed ``prefix + keystr(path)``.  Rebuild with
    :func:`restore_pytree` and a template of the same structure.

    Raises:
        MissingDependencyError: jax is not installed.
    """
    jax = require("jax", "storing a JAX pytree in a checkpoint")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    doc_leaves = []
    tensors: dict[str, np.ndarray] = {}
    for path, leaf in leaves:
        key = prefix + jax.tree_util.keystr(path)
        a = np.array(leaf, order="C", copy=True)
        tensors[key] = a
        doc_leaves.append({"key": key, "dtype": a.dtype.name, "shape": list(a.shape)})
    return {"treedef": str(treedef), "leaves": doc_leaves}, tensors


def restore_pytree(template: Any, doc: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *, what: str = "pytree") -> Any:
    """Rebuild a pytree saved by :func:`flatten_pytree` into the structure of ``template``.

    ``template`` is a freshly built tree of the same kind (``optimizer.init(params)``); its
    leaf count, paths, shapes and dtypes must match the saved ones.  Leaves come back as the
    template's leaf types (jax arrays stay jax arrays, numpy stays numpy, Python scalars
    stay Python scalars).

    Args:
        template: a tree of the structure to restore.
        doc: the document :func:`flatten_pytree` returned.
        tensors: its tensors.
        what: what the tree is, for messages (``"optax state"``).

    Raises:
        CheckpointError: the structures differ (every difference listed) — e.g. the
            optimizer configuration changed since the checkpoint was written.
        MissingDependencyError: jax is not installed.
    """
    jax = require("jax", f"restoring a {what} from a checkpoint")
    jnp = require("jax.numpy", f"restoring a {what} from a checkpoint")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    saved = list(doc.get("leaves", []))
    problems: list[str] = []
    if str(treedef) != doc.get("treedef"):
        problems.append(f"structure differs: saved {doc.get('treedef')} vs now {treedef}")
    if len(saved) != len(leaves):
        problems.append(f"saved {len(saved)} leaves, the current structure has {len(leaves)}")
    out = []
    for i, ((path, leaf), s) in enumerate(zip(leaves, saved)):
        cur = np.asarray(leaf)
        key = s.get("key")
        if key not in tensors:
            problems.append(f"leaf {i} ({key}): tensor missing")
            continue
        a = tensors[key]
        if list(a.shape) != list(cur.shape) or a.dtype != cur.dtype:
            problems.append(
                f"leaf {i} {jax.tree_util.keystr(path)}: saved {a.dtype.name}{list(a.shape)}, "
                f"expected {cur.dtype.name}{list(cur.shape)}"
            )
            continue
        if isinstance(leaf, jax.Array):
            out.append(jnp.asarray(a))
        elif isinstance(leaf, np.ndarray):
            out.append(np.array(a))
        elif isinstance(leaf, np.generic):
            out.append(a[()])
        else:
            out.append(type(leaf)(a.item()))
    if problems:
        raise CheckpointError.listing(
            f"the saved {what} does not fit the current one (did the model or optimizer change since the "
            "checkpoint was written? use the same settings or a new --ckpt-dir):",
            problems,
        )
    return jax.tree_util.tree_unflatten(treedef, out)
