"""``exporter inspect`` for models: a bundle, a model-zoo directory, or an ``.onnx`` file.

    inspect_model(path) -> ModelInfo      provenance, verdict, inputs/outputs with dims, opset, size

A bundle shows its manifest's provenance (registry model, framework, exporter, checkpoint,
versions) and the export's verdict (``parity.json``); a model-zoo directory its data
sets; every kind the ONNX graph's inputs and outputs (dtype and dims, symbolic names kept),
opsets, IR version, producer, node and parameter counts, and bytes on disk (external data
included).  Reads only: onnx is the one import.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import BundleError, UsageError

__all__ = ["ModelInfo", "is_model_path", "inspect_model"]


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`inspect_model` found.

    Attributes:
        path: what was inspected.
        kind: ``"bundle"``, ``"zoo"`` or ``"onnx"``.
        onnx_file: the model file.
        bytes: model file plus external data, on disk.
        opsets: domain -> version (``""`` is the default ONNX domain).
        ir_version, producer: from the ModelProto.
        inputs, outputs: ``{"name", "type", "dtype", "dims"}`` each (initializers are not inputs).
        nodes, initializers, parameters: graph sizes (parameters = elements of all initializers).
        provenance: the bundle manifest's provenance fields (bundles only).
        verdict: ``{"ok", "checks", "cases", "failures", "reference", "candidate"}`` from parity.json (bundles).
        data_sets: test data set directories (bundles and zoo dirs).
        metadata: the model's ``metadata_props``.
    """

    path: Path
    kind: str
    onnx_file: Path
    bytes: int
    opsets: dict[str, int]
    ir_version: int
    producer: str
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]
    nodes: int
    initializers: int
    parameters: int
    provenance: dict[str, Any] = field(default_factory=dict)
    verdict: dict[str, Any] | None = None
    data_sets: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "kind": self.kind, "onnx_file": str(self.onnx_file), "bytes": self.bytes,
            "opsets": dict(self.opsets), "ir_version": self.ir_version, "producer": self.producer,
            "inputs": [dict(i) for i in self.inputs], "outputs": [dict(o) for o in self.outputs],
            "nodes": self.nodes, "initializers": self.initializers, "parameters": self.parameters,
            "provenance": dict(self.provenance), "verdict": self.verdict, "data_sets": list(self.data_sets),
            "metadata": dict(self.metadata),
        }  # fmt: skip

    def lines(self) -> list[str]:
        """Readable lines for the terminal."""
        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(self.opsets.items()))
        out = [
            f"{self.path}: {self.kind}, {self.onnx_file.name} {_size(self.bytes)}, opset {opsets}, IR {self.ir_version}"
            + (f", producer {self.producer}" if self.producer else ""),
            f"  graph: {self.nodes} nodes, {self.initializers} initializers, {self.parameters:,} parameters",
        ]
        if self.verdict is not None:
            v = self.verdict
            head = "PASS" if v.get("ok") else "FAIL"
            out.append(f"  verdict: {head}, {v.get('candidate')} vs {v.get('reference')}, {v.get('checks')} checks over {v.get('cases')} cases")
            out += [f"    - {f}" for f in v.get("failures", [])[:20]]
        for key, value in self.provenance.items():
            out.append(f"  {key}: {value if not isinstance(value, (dict, list)) else json.dumps(value, sort_keys=True)}")
        for title, values in (("inputs", self.inputs), ("outputs", self.outputs)):
            out.append(f"  {title}:")
            out += [f"    {v['name']}: {v['dtype']}[{', '.join('?' if d is None else str(d) for d in v['dims'] or [])}]"
                    + ("" if v["type"] == "tensor" else f" ({v['type']})") for v in values]  # fmt: skip
        if self.data_sets:
            out.append(f"  test data: {len(self.data_sets)} sets ({', '.join(self.data_sets[:6])}{', ...' if len(self.data_sets) > 6 else ''})")
        return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


_PROVENANCE_KEYS = ("model", "framework", "variant", "summary", "exporter", "fallback_reason", "checkpoint", "seed", "created", "versions")


def _value(v: Any) -> dict[str, Any]:
    from onnx import TensorProto

    from exporter.testdata import value_dims

    kind = (v.type.WhichOneof("value") or "tensor_type").removesuffix("_type")
    dtype = "?"
    if kind == "tensor":
        dtype = TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
        dtype = {"float": "float32", "double": "float64"}.get(dtype, dtype)
    return {"name": v.name, "type": kind, "dtype": dtype, "dims": value_dims(v)}


def is_model_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is something :func:`inspect_model` reads: an ``.onnx`` file, or a
    directory holding ``model.onnx`` (a bundle or a model-zoo directory)."""
    p = Path(path)
    return (p.is_file() and p.suffix == ".onnx") or (p.is_dir() and (p / "model.onnx").is_file())


def inspect_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Describe a bundle, a model-zoo directory or an ``.onnx`` file.

    Raises:
        UsageError: ``path`` is none of those.
        BundleError: an unreadable model, manifest or parity.json.
    """
    import onnx

    p = Path(path)
    if not is_model_path(p):
        raise UsageError(f"{str(p)!r} is not an .onnx file or a directory holding model.onnx")
    root = p if p.is_dir() else None
    manifest: dict[str, Any] = {}
    if root is not None and (root / "manifest.json").is_file():
        from exporter.bundle import read_manifest

        manifest = read_manifest(root)
    onnx_file = (root / str((manifest.get("onnx") or {}).get("file", "model.onnx"))) if root is not None else p
    try:
        model = onnx.load(str(onnx_file), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise BundleError(f"{onnx_file} is not a readable ONNX model ({type(e).__name__}: {e})") from e
    g = model.graph
    init = {t.name for t in g.initializer}
    parameters = 0
    external: set[str] = set()
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= int(d)
        parameters += n
        if t.data_location == onnx.TensorProto.EXTERNAL:
            external.update(e.value for e in t.external_data if e.key == "location")
    size = onnx_file.stat().st_size + sum((onnx_file.parent / f).stat().st_size for f in external if (onnx_file.parent / f).is_file())
    verdict = None
    if manifest:
        parity_file = root / str((manifest.get("parity") or {}).get("report", "parity.json"))  # type: ignore[operator]
        if parity_file.is_file():
            try:
                rep = json.loads(parity_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BundleError(f"{parity_file} cannot be read as JSON ({e}); re-export the bundle") from e
            verdict = {
                "ok": bool(rep.get("ok")), "checks": len(rep.get("checks", [])), "cases": len(rep.get("cases", [])),
                "reference": rep.get("reference"), "candidate": rep.get("candidate"), "failures": list(rep.get("failures", [])),
            }  # fmt: skip
    sets: tuple[str, ...] = ()
    if root is not None:
        found = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("test_data_set_") and d.name[14:].isdigit()]
        sets = tuple(d.name for d in sorted(found, key=lambda d: int(d.name[14:])))
    return ModelInfo(
        path=p,
        kind="bundle" if manifest else "zoo" if sets else "onnx",
        onnx_file=onnx_file,
        bytes=size,
        opsets={o.domain: int(o.version) for o in model.opset_import},
        ir_version=int(model.ir_version),
        producer=" ".join(x for x in (model.producer_name, model.producer_version) if x),
        inputs=tuple(_value(v) for v in g.input if v.name not in init),
        outputs=tuple(_value(v) for v in g.output),
        nodes=len(g.node),
        initializers=len(g.initializer),
        parameters=parameters,
        provenance={k: manifest[k] for k in _PROVENANCE_KEYS if manifest.get(k) is not None},
        verdict=verdict,
        data_sets=sets,
        metadata={m.key: m.value for m in model.metadata_props},
    )
