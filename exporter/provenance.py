"""What a bundle was made from, and whether its files are still what was written.

A bundle's manifest records two things for incremental exports (``exporter.incremental``):

``built_from``
    The inputs that decide the bundle's content (:func:`record`):

    - ``state``: the checkpoint's content hash (``sha256``, as ``exporter.state`` reports
      it) or, for a seeded state, its seed and the framework that initialised it;
    - ``model``: the model's definition: the sha256 of every source file of its registry
      module and factories, and the modules they import from the same package
      (:func:`model_sources`), plus a model family's config values;
    - ``options``: every option that changes the output (opset, the sweep's cases and
      inputs, tolerance overrides, rename rules, external data, onnxruntime threads);
    - ``exporter``: the sha256 of exporter's own source (:func:`exporter_source_sha256`),
      so an edited checkout rebuilds even when its version string did not change;
    - ``versions``: exporter, Python, torch, jax, jaxlib, flax, jax2onnx, onnx, onnxscript,
      onnxruntime, numpy (package metadata; nothing is imported).

``files``
    ``{relative path: {"bytes", "sha256"}}`` of every file of the bundle but the manifest
    itself (:func:`file_table`), so that a changed, truncated or missing file is noticed
    without running anything (:func:`check_files`).

Everything here is cheap: source files are hashed once per process, nothing heavy is
imported.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.hashing import new_hash, sha256_entries, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec
    from exporter.parity import Run
    from exporter.plan import ExportPlan

__all__ = [
    "RECORD_KEY",
    "FILES_KEY",
    "RECORD_VERSION",
    "record",
    "state_record",
    "model_sources",
    "exporter_source_sha256",
    "runs_sha256",
    "file_table",
    "check_files",
    "differences",
]

RECORD_KEY = "built_from"
FILES_KEY = "files"
RECORD_VERSION = 1
_MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- sources
@functools.lru_cache(maxsize=1)
def exporter_source_sha256() -> str:
    """sha256 over exporter's own source files (its package and ``exporter.runtimes``, not
    ``exporter.models``: a model's files are part of that model's record), each as
    ``"<relative path>\\0<sha256>\\n"`` in sorted order.  Computed once per process."""
    import exporter
    import exporter.models
    import exporter.runtimes

    models_dirs = [Path(p).resolve() for p in exporter.models.__path__]
    entries: dict[str, str] = {}
    for label, pkg in (("exporter", exporter), ("exporter/runtimes", exporter.runtimes)):
        for base in (Path(p).resolve() for p in pkg.__path__):
            for f in sorted(base.rglob("*.py")):
                if any(f.is_relative_to(m) for m in models_dirs) or "__pycache__" in f.parts:
                    continue
                entries[f"{label}/{f.relative_to(base).as_posix()}"] = sha256_file(f)
    return sha256_entries((rel, entries[rel]) for rel in sorted(entries))


def _module_file(name: str) -> Path | None:
    mod = sys.modules.get(name)
    origin = getattr(mod, "__file__", None) if mod is not None else None
    if origin is None:
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        origin = found.origin if found is not None else None
    if not origin or not origin.endswith(".py"):
        return None
    return Path(origin).resolve()


def _imported_names(path: Path, module: str) -> set[str]:
    """Module names ``path`` imports (anywhere in it: lazy imports count), with ``from X
    import Y`` also giving ``X.Y`` (Y may be a submodule)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                try:
                    base = importlib.util.resolve_name("." * node.level + base, package)
                except (ImportError, ValueError):
                    continue
            if base:
                names.add(base)
                names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return names


def _roots(module: str, path: Path) -> list[Path]:
    """Where a model's own source lives: the ``exporter.models`` package, and the package
    (or, for a top-level module, the directory) that ``module`` belongs to."""
    import exporter.models

    roots = [Path(p).resolve() for p in exporter.models.__path__]
    top = module.partition(".")[0]
    top_file = _module_file(top)
    if top != "exporter":
        roots.append(top_file.parent if top_file is not None else path.parent)
    return roots


def _factory_module(fn: Any) -> str | None:
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__module__", None)


def model_sources(spec: ModelSpec) -> dict[str, str]:
    """``{module name: sha256 of its source}`` of the model's definition.

    The modules are the one that registered the model, those of its factories, and,
    transitively, every module they import that lives in ``exporter.models`` or in the
    registering module's own package.  exporter's own modules are covered by
    :func:`exporter_source_sha256` instead.
    """
    from exporter.models import registry

    start = {m for m in (registry.origin(spec.name), _factory_module(spec.torch_factory), _factory_module(spec.flax_factory)) if m}
    return _closure(tuple(sorted(start)))


@functools.lru_cache(maxsize=64)
def _closure(start: tuple[str, ...]) -> dict[str, str]:
    todo = list(start)
    roots: list[Path] = []
    # dotted names are looked up only in these packages (finding torch.nn would import torch);
    # a top-level name is only located, never imported, so the root check decides it
    packages = {"exporter.models"} | {m.partition(".")[0] for m in start if not m.startswith("exporter.")}
    for m in start:
        f = _module_file(m)
        if f is not None:
            roots += _roots(m, f)
    seen: dict[str, str] = {}
    while todo:
        name = todo.pop()
        if name in seen or ("." in name and not any(name == p or name.startswith(p + ".") for p in packages)):
            continue
        f = _module_file(name)
        if f is None or not any(f.is_relative_to(r) for r in roots):
            continue
        seen[name] = sha256_file(f)
        todo.extend(sorted(_imported_names(f, name) - seen.keys()))
    return dict(sorted(seen.items()))


# --------------------------------------------------------------------------- the record
def runs_sha256(runs: Sequence[Run]) -> str:
    """sha256 over the sweep: every case's label, dims and input arrays (dtype, shape, bytes)."""
    h = new_hash("sha256")
    for label, dims, feed in runs:
        h.update(json.dumps([label, dict(dims)], sort_keys=True).encode() + b"\0")
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
            h.update(a.tobytes())  # the sweep's inputs: small
    return h.hexdigest()


def state_record(plan: ExportPlan, checkpoint_sha256: str | None) -> dict[str, Any]:
    """The ``state`` part of :func:`record`: a checkpoint's hash, or how a seeded state is made."""
    if plan.checkpoint is None:
        return {"seeded": True, "seed": plan.seed, "initialised_by": plan.frameworks[0]}
    assert checkpoint_sha256, "a checkpoint's record needs its content hash"
    record: dict[str, Any] = {"seeded": False, "sha256": checkpoint_sha256}
    if plan.rename:
        record["rename"] = [list(r) for r in plan.rename]
    return record


def record(plan: ExportPlan, framework: str, checkpoint_sha256: str | None, *, variant: str | None = None) -> dict[str, Any]:
    """What the bundle ``plan.bundle_dir(framework)`` (or its ``variant``) is made from.

    Args:
        plan: the model's export plan.
        framework: the bundle's framework.
        checkpoint_sha256: the checkpoint's content hash (``exporter.state``'s ``sha256``);
            None for a seeded state.
        variant: a variant's name: its options are added (``plan.variant_options``).
    """
    from exporter import onnx_export

    spec = plan.spec
    options: dict[str, Any] = {
        "opset": plan.opset,
        "sweep_sha256": runs_sha256(plan.runs),
        "cases": len(plan.runs),
        "atol": plan.atol,
        "rtol": plan.rtol,
        "external_data": plan.external_data,
        "intra_op_threads": plan.intra_op_threads,
    }
    if variant is not None:
        options["variant"] = variant
        options["variant_options"] = dict((plan.variant_options or {}).get(variant, {}))
    config = plan.config
    return {
        "record_version": RECORD_VERSION,
        "model": spec.name,
        "framework": framework,
        "state": state_record(plan, checkpoint_sha256),
        "definition": {
            "sources": model_sources(spec),
            "config": None if config is None else {"family": config.get("family"), "values": config.get("values")},
        },
        "options": options,
        "exporter_source_sha256": exporter_source_sha256(),
        "versions": onnx_export.versions(),
    }


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 20 else s[:12] + "..."


def differences(old: Any, new: Mapping[str, Any]) -> list[str]:
    """Why a recorded ``old`` record is not ``new``, one line per differing entry
    (``"state.sha256: 3f2a... -> 9c1b..."``, ``"definition.sources.exporter.models.mlp: changed"``)."""
    if not isinstance(old, Mapping):
        return ["the bundle records nothing of what it was made from (written by an older exporter)"]
    a, b = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
    lines = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key, _MISSING) == b.get(key, _MISSING):
            continue
        if key.startswith("definition.sources.") or key == "exporter_source_sha256":
            what = "added" if key not in a else "removed" if key not in b else "changed"
            lines.append(f"{key}: {what}")
        else:
            lines.append(f"{key}: {_short(a.get(key, 'absent'))} -> {_short(b.get(key, 'absent'))}")
    return lines


_MISSING = object()


# --------------------------------------------------------------------------- files
def file_table(root: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{relative POSIX path: {"bytes", "sha256"}}`` of every file under ``root`` but its manifest."""
    base = Path(root)
    out: dict[str, dict[str, Any]] = {}
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            f = Path(dirpath) / name
            rel = f.relative_to(base).as_posix()
            if rel != _MANIFEST:
                out[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return dict(sorted(out.items()))


def check_files(root: str | os.PathLike[str], table: Any) -> list[str]:
    """Problems of the files under ``root`` against a :func:`file_table` record: missing,
    resized or changed files, and files that were not there when it was written."""
    if not isinstance(table, Mapping) or not table:
        return ["the manifest lists no files (written by an older exporter)"]
    base = Path(root)
    problems = []
    for rel, want in table.items():
        f = base / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif not isinstance(want, Mapping) or f.stat().st_size != want.get("bytes"):
            problems.append(f"{rel}: size changed")
        elif sha256_file(f) != want.get("sha256"):
            problems.append(f"{rel}: content changed (sha256)")
    for dirpath, _dirs, names in os.walk(base):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(base).as_posix()
            if rel != _MANIFEST and rel not in table:
                problems.append(f"{rel}: not written by the export")
    return problems
