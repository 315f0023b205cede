"""Which module of the model broke: first-divergence localisation for a bundle.

(The module is not called ``explain``: ``exporter.explain`` is the API function, and a
submodule of that name would replace it as an attribute of the package once imported.)

    explain(bundle)
      1. state: the bundle's state.safetensors, ``checkpoint=``, or the path the manifest
         records; its sha256 must match the manifest's before it is used;
      2. the framework build runs every test data set with every submodule's output
         captured (:mod:`exporter.capture`: torch forward hooks, flax method interception);
      3. a copy of model.onnx that also outputs each module's ONNX value runs the same
         inputs (onnxruntime with graph optimisations off, so every value exists, or the
         ONNX reference evaluator); the bundle's file is never changed;
      4. each module's output is compared with its ONNX value (``exporter.parity.compare``,
         the bundle's dtype tolerances), in execution order.

**Mapping modules to ONNX values.**  Each ONNX node has a module scope: for torch exports
the ``pkg.torch.onnx.name_scopes`` metadata torch.onnx records (or TorchScript's
``/a/b/Op`` node names); for flax the module paths :mod:`exporter.flax_scopes` records at
export (jax2onnx records none; a bundle made without them has its model exported again
while recording, and the scopes are carried over by node name).  A module's ONNX output is
the value, among those produced inside its scope and used outside it, whose shape matches
the module's output (or is that shape with the channel axis moved: flax NHWC vs ONNX NCHW,
compared after transposing); of several, the one that depends on all the others, else the
only one that matches the framework's value; the root module's are the graph outputs.  A
module with no node in its scope (fused away, e.g. a Conv whose BatchNorm the exporter
folded into it) is ``absent``, one without a fitting value ``unmapped``, one with several
candidates or called more than once ``ambiguous``: none of them is guessed.

**The first divergence.**  Modules are walked in the order their calls finished (a child
before its parent).  A module's *inputs* are the already-mapped values (and graph inputs)
where the backward walk from its output stops, and its *nodes* are the ones that walk
crossed: everything the module's output depends on that no earlier module accounts for
(a functional ``gelu`` between two Linears belongs to the second).  The first divergence is
the first module, at any test case, whose output is out of tolerance while all its inputs
are within it; its nodes are where the export differs.  ``growth`` is the output's
max_abs over the inputs' max_abs.  When a value has NaN/Inf where the framework has none,
the first node (in graph order) that makes a non-finite value from finite inputs is
reported as well.

**What is compared.**  Every module value at the dtype tolerance the bundle records
(``exporter.parity.tolerance_for`` with the manifest's table; graph outputs their own);
values of a reduced-precision variant (float16) in the framework's dtype at the narrower
dtype's tolerance.  Where a module fails at a case, that case is compared again over only
the elements the model's outputs depend on (:mod:`exporter.capture`'s relevance masks):
hidden states at padded positions, which no output reads, do not count.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.errors import BundleError, StateMismatchError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from exporter.capture import Capture
    from exporter.models.registry import ModelSpec
    from exporter.onnx_graph import GraphIndex
    from exporter.parity import OutputCheck

__all__ = [
    "REPORT_FORMAT",
    "RUNTIMES",
    "NodeRef",
    "ModuleCheck",
    "NonFinite",
    "ExplainReport",
    "explain_bundle",
]

REPORT_FORMAT = "exporter-explain"
REPORT_FORMAT_VERSION = 1
RUNTIMES = ("onnxruntime", "reference")
ROOT_LABEL = "(model)"
_TABLE_NODES = 8


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class NodeRef:
    """One ONNX node: name, op type and the module scope recorded for it (None: none)."""

    name: str
    op_type: str
    scope: str | None

    def text(self) -> str:
        return f"{self.name} ({self.op_type})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "scope": self.scope}


@dataclass(frozen=True)
class ModuleCheck:
    """One framework module against its ONNX value, over every case.

    Attributes:
        module: the module's path (``""``: the whole model).
        kind: its class name.
        order: position in execution order (calls in the order they finished).
        status: ``"compared"``; ``"alias"`` (its ONNX value is an earlier module's, e.g. a
            container returning its last child's output); ``"absent"`` (no ONNX node has
            its scope); ``"unmapped"`` (no value of its output's shape leaves its scope);
            ``"ambiguous"`` (several candidates, or several calls).
        detail: why it is not compared, or how (a layout transpose).
        values: the ONNX values compared (or the candidates, when ambiguous).
        check: the worst ``OutputCheck`` over cases (``exporter.parity`` semantics), or None.
        failing_cases: cases where its output is out of tolerance.
        inputs: the values its inputs were checked on (earlier modules' values, graph inputs).
        input_max_abs: the worst max_abs of those inputs (at the case of ``check``).
        inputs_ok: whether the inputs were within tolerance at every failing case.
        growth: ``check.max_abs / input_max_abs`` (None when the inputs are exact).
        nodes: the nodes between its inputs and its output (all but shape arithmetic).
        other_nodes: how many shape-arithmetic nodes (int64 only) are in that span too.
        first: this is the first divergence.
    """

    module: str
    kind: str
    order: int
    status: str
    detail: str = ""
    values: tuple[str, ...] = ()
    check: OutputCheck | None = None
    failing_cases: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    input_max_abs: float | None = None
    inputs_ok: bool | None = None
    growth: float | None = None
    nodes: tuple[NodeRef, ...] = ()
    other_nodes: int = 0
    first: bool = False

    @property
    def label(self) -> str:
        return self.module or ROOT_LABEL

    @property
    def ok(self) -> bool:
        """Compared and within tolerance at every case (modules not compared are not failures)."""
        return self.check is None or self.check.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "kind": self.kind,
            "order": self.order,
            "status": self.status,
            "detail": self.detail,
            "values": list(self.values),
            "check": None if self.check is None else self.check.to_dict(),
            "failing_cases": list(self.failing_cases),
            "inputs": list(self.inputs),
            "input_max_abs": self.input_max_abs,
            "inputs_ok": self.inputs_ok,
            "growth": self.growth,
            "nodes": [n.to_dict() for n in self.nodes],
            "other_nodes": self.other_nodes,
            "first": self.first,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleCheck:
        from exporter.parity import OutputCheck

        values = dict(d)
        values["values"] = tuple(values["values"])
        values["check"] = None if values["check"] is None else OutputCheck.from_dict(values["check"])
        values["failing_cases"] = tuple(values["failing_cases"])
        values["inputs"] = tuple(values["inputs"])
        values["nodes"] = tuple(NodeRef(**n) for n in values["nodes"])
        return cls(**values)


@dataclass(frozen=True)
class NonFinite:
    """The first ONNX node that makes NaN/Inf from finite inputs.

    Attributes:
        case: the test case where it was found.
        node, op_type, scope: the node (``scope``: its recorded module, None: none).
        value: the output holding the non-finite values.
        kind: ``"NaN"``, ``"Inf"`` or ``"NaN and Inf"``.
        count, total: non-finite elements / elements of ``value``.
        module: the first module whose output has non-finite values the framework's has not.
    """

    case: str
    node: str
    op_type: str
    scope: str | None
    value: str
    kind: str
    count: int
    total: int
    module: str | None

    def line(self) -> str:
        where = f" (module {self.scope or ROOT_LABEL})" if self.scope is not None else ""
        return (
            f"first non-finite value: {self.kind} in {self.value!r} from node {self.node} ({self.op_type}){where} "
            f"at {self.case}: {self.count}/{self.total} elements, from finite inputs"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "node": self.node,
            "op_type": self.op_type,
            "scope": self.scope,
            "value": self.value,
            "kind": self.kind,
            "count": self.count,
            "total": self.total,
            "module": self.module,
        }


@dataclass(frozen=True)
class ExplainReport:
    """Where a bundle's ONNX model departs from its framework, module by module.

    ``bool(report)`` is True when the outputs pass, no module diverges and no value turns
    non-finite.

    Attributes:
        model, framework: the bundle's.
        bundle: its directory.
        runtime: what ran the ONNX copy (``"onnxruntime"`` with optimisations off, ``"reference"``).
        exporter: the exporter the manifest records.
        mapping: where module scopes came from (``"torch.onnx name_scopes"``, ...).
        cases: case labels run.
        outputs: the plain model's outputs against the bundle's test data (as ``verify``).
        modules: every module call, in execution order.
        first: the first diverging module's path (None: none).
        first_case: the case where it diverges first.
        nonfinite: the first node making NaN/Inf, if any.
        notes: things the reader should know (state provenance, mapping gaps, ...).
        seconds: wall time per phase.
    """

    model: str
    framework: str
    bundle: str
    runtime: str
    exporter: str
    mapping: str
    cases: tuple[str, ...]
    outputs: tuple[OutputCheck, ...]
    modules: tuple[ModuleCheck, ...]
    first: str | None = None
    first_case: str | None = None
    nonfinite: NonFinite | None = None
    notes: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.outputs) and all(c.ok for c in self.outputs) and self.first is None and self.nonfinite is None

    def __bool__(self) -> bool:
        return self.ok

    @property
    def divergence(self) -> ModuleCheck | None:
        """The :class:`ModuleCheck` of the first diverging module."""
        for m in self.modules:
            if m.first:
                return m
        return None

    def module(self, path: str) -> ModuleCheck:
        """The check of the module at ``path`` (its first call)."""
        for m in self.modules:
            if m.module == path:
                return m
        raise KeyError(path)

    def summary(self) -> str:
        """One line: the verdict and where it breaks."""
        bad = [c for c in self.outputs if not c.ok]
        head = f"{self.model} ({self.framework}): explain, {self.runtime} vs {self.framework} over {len(self.cases)} cases"
        if self.first is not None:
            d = self.divergence
            assert d is not None and d.check is not None
            tail = f"first divergence at {d.label} ({d.kind}), from case {self.first_case}"
        elif self.nonfinite is not None:
            tail = f"non-finite values from node {self.nonfinite.node} ({self.nonfinite.op_type})"
        elif bad:
            tail = f"{len(bad)} output checks fail, but no module's output leaves tolerance (see notes)"
        else:
            tail = "no divergent module"
        return f"{head}: {tail}"

    def lines(self) -> list[str]:
        """The first divergence (and first non-finite node) in a few lines, for messages."""
        out = []
        d = self.divergence
        if d is not None and d.check is not None:
            c = d.check
            nonfinite = f", {c.nan_mismatch} NaN/Inf mismatches" if c.nan_mismatch else ""
            out.append(
                f"first divergence: {d.label} ({d.kind}), from case {self.first_case}; worst at {c.case}: "
                f"max_abs {_fmt(c.max_abs)}, max_rel {_fmt(c.max_rel)}, {c.n_bad}/{c.n_total} elements out of "
                f"tolerance{nonfinite} (atol {c.atol:g}, rtol {c.rtol:g}); its inputs {', '.join(d.inputs) or '-'}: "
                f"max_abs {_fmt(d.input_max_abs)}"
                + (f", growth x{_fmt(d.growth)}" if d.growth is not None else ", exact")
            )
            shown = ", ".join(n.text() for n in d.nodes[:_TABLE_NODES])
            more = f" ... and {len(d.nodes) - _TABLE_NODES} more" if len(d.nodes) > _TABLE_NODES else ""
            out.append(f"  ONNX nodes: {shown or '-'}{more}")
        if self.nonfinite is not None:
            out.append(self.nonfinite.line())
        return out

    def table(self) -> str:
        """A readable table: one row per module in execution order, then the first divergence."""
        header = ("#", "module", "kind", "max_abs", "max_rel", "nan/inf", "atol", "rtol", "in_max_abs", "growth", "verdict", "note")
        rows = []
        for m in self.modules:
            c = m.check
            if c is None:
                verdict = m.status
            elif m.first:
                verdict = "FIRST"
            else:
                verdict = "ok" if c.ok else "FAIL"
            num = c is not None
            rows.append(
                (
                    str(m.order),
                    m.label,
                    m.kind,
                    _fmt(c.max_abs) if num else "-",
                    _fmt(c.max_rel) if num else "-",
                    str(c.nan_mismatch) if num else "-",
                    f"{c.atol:g}" if num else "-",
                    f"{c.rtol:g}" if num else "-",
                    _fmt(m.input_max_abs) if num else "-",
                    _fmt(m.growth) if num and m.growth is not None else "-",
                    verdict,
                    m.detail,
                )
            )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        text = [self.summary()]
        text += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
        text += self.lines()
        text += [f"note: {n}" for n in self.notes]
        return "\n".join(text)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (no NaN or Inf)."""
        return {
            "format": REPORT_FORMAT,
            "format_version": REPORT_FORMAT_VERSION,
            "model": self.model,
            "framework": self.framework,
            "bundle": self.bundle,
            "runtime": self.runtime,
            "exporter": self.exporter,
            "mapping": self.mapping,
            "ok": self.ok,
            "summary": self.summary(),
            "cases": list(self.cases),
            "outputs": [c.to_dict() for c in self.outputs],
            "modules": [m.to_dict() for m in self.modules],
            "first": self.first,
            "first_case": self.first_case,
            "nonfinite": None if self.nonfinite is None else self.nonfinite.to_dict(),
            "notes": list(self.notes),
            "seconds": dict(self.seconds),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExplainReport:
        """Inverse of :meth:`to_dict`.

        Raises:
            UsageError: ``d`` is not an explain report.
        """
        from exporter.parity import OutputCheck

        if d.get("format") != REPORT_FORMAT:
            raise UsageError(f"not an explain report: format is {d.get('format')!r}, expected {REPORT_FORMAT!r}")
        return cls(
            model=d["model"],
            framework=d["framework"],
            bundle=d["bundle"],
            runtime=d["runtime"],
            exporter=d["exporter"],
            mapping=d["mapping"],
            cases=tuple(d["cases"]),
            outputs=tuple(OutputCheck.from_dict(c) for c in d["outputs"]),
            modules=tuple(ModuleCheck.from_dict(m) for m in d["modules"]),
            first=d["first"],
            first_case=d["first_case"],
            nonfinite=None if d["nonfinite"] is None else NonFinite(**d["nonfinite"]),
            notes=tuple(d["notes"]),
            seconds=dict(d["seconds"]),
        )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


# --------------------------------------------------------------------------- state
def _load_state(
    root: Path, manifest: Mapping[str, Any], spec: ModelSpec, checkpoint: str | os.PathLike[str] | None, rename: Sequence[tuple[str, str]]
) -> tuple[dict[str, np.ndarray], str]:
    """The canonical state the bundle was exported from, checked against the manifest's sha256."""
    from exporter import rebuild
    from exporter import state as state_io
    from exporter.hashing import sha256_path

    info = manifest.get("checkpoint") or {}
    recorded = str(info.get("path") or "")
    if checkpoint is not None:
        path = Path(checkpoint)
        origin = "checkpoint="
    elif recorded:
        path = Path(recorded) if Path(recorded).is_absolute() else root / recorded
        source = manifest.get("source_bundle")
        if not path.exists() and not Path(recorded).is_absolute() and isinstance(source, str):
            path = root.parent / source / recorded  # a variant bundle: the state is its source bundle's
        origin = "the manifest"
    else:
        raise UsageError(f"bundle {str(root)!r} records no state file; pass the state it was exported from (--checkpoint PATH)")
    if not path.exists():
        raise UsageError(
            f"state {str(path)!r} (from {origin}) does not exist; pass the state bundle {str(root)!r} was exported "
            "from with --checkpoint PATH"
        )
    read_state = getattr(state_io, "read_state", None)
    if read_state is not None:
        loaded = read_state(path)
        arrays, digest, where = loaded.arrays, loaded.sha256, str(loaded.path)
    else:  # exporter.state without read_state: hash, then load
        digest, where = sha256_path(path), str(path)
        arrays = state_io.load_state(path)
    want = info.get("sha256")
    if want and digest != want and sha256_path(path) != want:
        raise StateMismatchError(
            f"state {where} has sha256 {digest[:16]}..., but bundle {str(root)!r} was exported from sha256 "
            f"{str(want)[:16]}... ({info.get('path') or 'unknown path'}); pass the state it was exported from "
            "(--checkpoint PATH)"
        )
    renames = tuple(tuple(r) for r in (rename or info.get("rename") or ()))
    canonical, _ = rebuild.prepare_state(spec, arrays, strict=True, rename=renames, source=where)  # type: ignore[arg-type]
    verified = "sha256 matches the manifest" if want else "the manifest records no sha256: not verified"
    return canonical, f"state: {where} ({verified})"


# --------------------------------------------------------------------------- scopes
_SCOPE_CACHE: dict[tuple[Any, ...], dict[str, tuple[str, str | None]]] = {}
_SCOPE_CACHE_SIZE = 8


def _fresh_scopes(spec: ModelSpec, variables: Any, opset: int) -> dict[str, tuple[str, str | None]] | str:
    """``{node name: (op type, recorded scope)}`` of a fresh, scope-recording export of the flax
    model, or why there is none.  Cached per model structure (names, shapes, dtypes, opset,
    jax2onnx version): explaining several bundles of one model exports it once."""
    import jax
    import jax2onnx
    import onnx

    from exporter import flax_scopes, onnx_export

    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    key = (
        id(spec), spec.name, opset, getattr(jax2onnx, "__version__", ""),
        tuple((jax.tree_util.keystr(p), tuple(np.shape(v)), str(v.dtype)) for p, v in leaves),
    )  # fmt: skip
    if key in _SCOPE_CACHE:
        return _SCOPE_CACHE[key]
    with tempfile.TemporaryDirectory(prefix="exporter-explain-") as tmp:
        with flax_scopes.recording() as rec:
            if not rec.active:
                return rec.reason
            onnx_export.export_flax(spec, variables, Path(tmp) / "scopes.onnx", opset=opset)
        fresh = onnx.load(str(Path(tmp) / "scopes.onnx"), load_external_data=False)
    recorded = flax_scopes.node_scopes(fresh)
    out = {n.name: (n.op_type, recorded.get(n.name)) for n in fresh.graph.node}
    while len(_SCOPE_CACHE) >= _SCOPE_CACHE_SIZE:
        _SCOPE_CACHE.pop(next(iter(_SCOPE_CACHE)))
    _SCOPE_CACHE[key] = out
    return out


def _flax_scopes(spec: ModelSpec, variables: Any, opset: int, index: GraphIndex) -> tuple[dict[str, str | None], str, list[str]]:
    """Scopes of the bundle's nodes, carried over by node name from a fresh export of the same flax model."""
    fresh = _fresh_scopes(spec, variables, opset)
    if isinstance(fresh, str):
        return {n.name: None for n in index.nodes}, "", [f"flax module scopes unavailable: {fresh}"]
    notes: list[str] = []
    scopes: dict[str, str | None] = {}
    unmatched = 0
    for n in index.nodes:
        op, scope = fresh.get(n.name, ("", None))
        if op == n.op_type:
            scopes[n.name] = scope
        else:
            scopes[n.name] = None
            unmatched += 1
    if unmatched:
        notes.append(
            f"{unmatched} of {len(index.nodes)} ONNX nodes are not in a fresh export of the flax model (edited after "
            "export, or another jax2onnx version); they have no module scope"
        )
    return scopes, "jax2onnx scopes (recorded by re-exporting the flax model)", notes


# --------------------------------------------------------------------------- mapping
_SHAPE_OPS = frozenset({"Shape", "Size"})


def _shape_arithmetic(index: GraphIndex, node: Any) -> bool:
    """Nodes that compute shapes and indices (int64 only), listed as a count, not by name."""
    import onnx

    if node.op_type in _SHAPE_OPS:
        return True
    types = [index.elem_types.get(o) for o in node.outputs if o]
    return bool(types) and all(t == onnx.TensorProto.INT64 for t in types)


def _layout(ref: tuple[int, ...], got: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes permutation that makes a framework array of shape ``ref`` an ONNX one of
    shape ``got``: identity, or the channel axis moved (NHWC <-> NCHW); None if neither."""
    if ref == got:
        return tuple(range(len(ref)))
    r = len(ref)
    if r >= 3 and len(got) == r:
        for perm in ((0, r - 1, *range(1, r - 1)), (0, *range(2, r), 1)):
            if tuple(ref[p] for p in perm) == got:
                return perm
    return None


def _perm_text(perm: tuple[int, ...]) -> str:
    r = len(perm)
    if perm == (0, r - 1, *range(1, r - 1)):
        return "channels-last framework value compared as channels-first (NHWC -> NCHW)"
    return "channels-first framework value compared as channels-last (NCHW -> NHWC)"


@dataclass
class _Module:
    path: str
    kind: str
    order: int
    calls: int
    status: str = "compared"
    detail: str = ""
    candidates: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)  # ONNX values, one per framework output
    outputs: list[int] = field(default_factory=list)  # index into the framework outputs, per value
    perms: list[tuple[int, ...]] = field(default_factory=list)


def _worst(checks: Sequence[OutputCheck]) -> OutputCheck:
    def key(c: OutputCheck) -> tuple[Any, ...]:
        return (not c.ok, c.nan_mismatch, c.max_rel if c.max_rel is not None else float("inf"), c.max_abs or 0.0)

    return max(checks, key=key)


# --------------------------------------------------------------------------- explain
def explain_bundle(
    root: Path,
    manifest: Mapping[str, Any],
    *,
    recorded: Mapping[str, Mapping[str, Any]] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    runtime: str = "onnxruntime",
    rename: Sequence[tuple[str, str]] = (),
    cases: Sequence[str] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    relevant_only: bool = True,
    intra_op_threads: int | None = None,
) -> ExplainReport:
    """Find the first module of a bundle's model whose ONNX output leaves tolerance.

    ``exporter.explain(bundle)`` (``exporter.api.explain``) finds and reads the bundle and
    calls this.

    Args:
        root: the bundle directory.
        manifest: its parsed manifest (``exporter.bundle.read_manifest``).
        recorded: its tolerance table as ``Tolerance`` values (``exporter.bundle.recorded_tolerances``).
        checkpoint: the state the bundle was exported from, when the bundle holds none and
            the path in its manifest is not there; its sha256 must match the manifest's.
        runtime: ``"onnxruntime"`` (graph optimisations off for the instrumented copy) or
            ``"reference"`` (``onnx.reference``).
        rename: key renames the export used (``--rename``), if the manifest does not record them.
        cases: labels of the test data sets to run (``"batch=2,seq=16"``); default: all.
        atol, rtol: tolerance overrides (default: the manifest's, per dtype; intermediate
            values get the tolerance of their dtype, graph outputs their own).
        relevant_only: compare only the elements of a module's output that the model's
            outputs depend on (see :mod:`exporter.capture`); False compares every element.
        intra_op_threads: onnxruntime threads (None: its default).

    Returns:
        The :class:`ExplainReport`; ``bool(report)`` is True when nothing diverges.

    Raises:
        BundleError: an incomplete bundle.
        UsageError: an unknown runtime or case, no state to rebuild from, bad tolerances.
        UnknownModelError: the bundle's model is not registered (pass ``--registry``).
        StateMismatchError: the state is not the one the bundle was exported from.
        StateFileError, MissingDependencyError: the state cannot be read / the framework is missing.
    """
    import onnx

    from exporter import onnx_graph, rebuild
    from exporter.capture import SEPARATORS, capturer
    from exporter.hashing import sha256_file
    from exporter.models import registry
    from exporter.parity import tolerance_for as parity_tolerance_for
    from exporter.testdata import read_test_data

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r} for explain; choose one of {', '.join(RUNTIMES)}")
    root = Path(root)
    framework = str(manifest.get("framework", ""))
    if framework not in SEPARATORS:
        raise BundleError(f"bundle {str(root)!r}: manifest framework {framework!r} is not torch or flax; re-export it")
    spec = registry.get(str(manifest.get("model", "")))
    sep = SEPARATORS[framework]
    notes: list[str] = []

    onnx_info = manifest.get("onnx") or {}
    onnx_file = root / str(onnx_info.get("file", "model.onnx"))
    if not onnx_file.is_file():
        raise BundleError(f"bundle {str(root)!r}: {onnx_file.name} is missing; re-export it")
    if onnx_info.get("sha256") and sha256_file(onnx_file) != onnx_info["sha256"]:
        notes.append(f"{onnx_file.name} changed after export (its sha256 differs from the manifest's)")
    sets = list(manifest.get("test_data_sets") or [])
    if not sets:
        raise BundleError(f"bundle {str(root)!r} has no test data sets; re-export it")
    labels = [str(s.get("case") or s["dir"]) for s in sets]
    if cases is not None:
        unknown = [c for c in cases if c not in labels]
        if unknown:
            raise UsageError(f"bundle {str(root)!r} has no test case(s) {', '.join(unknown)}; it has: {', '.join(labels)}")
        sets = [s for s, lab in zip(sets, labels) if lab in set(cases)]
        labels = [lab for lab in labels if lab in set(cases)]
    data = [read_test_data(root / s["dir"]) for s in sets]
    dims = [dict(s.get("dims") or {}) for s in sets]
    # Graph outputs get their recorded per-output tolerance (by name); intermediate values,
    # whose names are no output's, the recorded tolerance of their dtype.
    tolerance = parity_tolerance_for(spec, atol=atol, rtol=rtol, recorded=recorded)  # type: ignore[arg-type]

    # 1-2. state, framework build; one capture first, to learn the module calls
    canonical, provenance = _load_state(root, manifest, spec, checkpoint, rename)
    notes.append(provenance)
    built = rebuild.torch_module(spec, canonical) if framework == "torch" else rebuild.flax_variables(spec, canonical)
    seconds["state"] = time.perf_counter() - t0
    t = time.perf_counter()
    cap = capturer(spec, framework, built)
    preference = _mapping_order(dims)  # cases whose shapes tell values apart best first
    pick = preference[0]
    picked = cap.run(data[pick][0])
    seconds["framework"] = time.perf_counter() - t
    order = picked.calls
    by_path: dict[str, int] = {}
    for c in order:
        by_path[c.path] = by_path.get(c.path, 0) + 1

    # 3. graph, scopes, candidate values
    t = time.perf_counter()
    proto = onnx.load(str(onnx_file), load_external_data=False)
    index = onnx_graph.GraphIndex(proto)
    if framework == "torch":
        raw_scopes, mapping = onnx_graph.torch_scopes(proto)
        scopes = {name: (s if s is None or s in by_path else _known_ancestor(s, by_path, sep)) for name, s in raw_scopes.items()}
    else:
        from exporter import flax_scopes

        recorded = flax_scopes.node_scopes(proto)
        if recorded:
            mapping = "jax2onnx scopes (recorded at export)"
            raw_f: dict[str, str | None] = {n.name: recorded.get(n.name) for n in index.nodes}
        else:
            raw_f, mapping, more = _flax_scopes(spec, built, int(manifest.get("opset") or 20), index)
            notes += more
        scopes = {n: (None if s is None else flax_scopes.resolve_scope(s, by_path)) for n, s in raw_f.items()}
    if not mapping:
        notes.append("the ONNX graph records no module scopes: only the outputs are compared")
    seconds["scopes"] = time.perf_counter() - t
    modules = _modules(order, by_path, index, scopes, sep, bool(mapping))

    # 4-6. per case: the framework's module outputs, the plain model's outputs (the verdict),
    # the instrumented copy's values; compare, and where a module fails, again over only
    # the elements that reach the outputs (that pass costs a backward pass: only there)
    exposed = list(dict.fromkeys(v for m in modules for v in m.candidates))
    checks: dict[str, list[OutputCheck | None]] = {}  # ONNX value -> check per case
    value_owner: dict[str, int] = {}
    per_module: dict[int, list[OutputCheck | None]] = {}
    outputs_checks: list[list[OutputCheck]] = [[] for _ in labels]
    failed_runs: list[str] = []
    with _OnnxRuns(proto, onnx_file, index, exposed, runtime, intra_op_threads, tolerance) as runner:
        t = time.perf_counter()
        picked_values = runner.run(data[pick], labels[pick], dims[pick])
        for k in preference[1:]:  # the mapping needs a case the model runs
            if picked_values[1] is not None:
                break
            pick, picked, picked_values = k, cap.run(data[k][0]), runner.run(data[k], labels[k], dims[k])
        seconds["onnx"] = time.perf_counter() - t
        calls = {c.path: c for c in picked.calls}
        for m in modules:
            if m.status == "compared":
                _assign(m, calls[m.path].outputs, picked_values[1] or {}, index, tolerance)
        compared = [m for m in modules if m.status == "compared"]
        for m in compared:
            per_module[m.order] = [None] * len(labels)
            for v in m.values:
                value_owner.setdefault(v, m.order)

        def compare_case(k: int, capture: Capture, got: Mapping[str, np.ndarray]) -> bool:
            """Fill the checks of case ``k``; whether a module other than the root fails there."""
            calls = {c.path: c for c in capture.calls}
            failing = False
            for m in compared:
                call = calls[m.path]
                cks = []
                for v, oi, perm in zip(m.values, m.outputs, m.perms):
                    if v not in got:
                        continue
                    row = checks.setdefault(v, [None] * len(labels))
                    if value_owner[v] != m.order and row[k] is not None:
                        cks.append(row[k])  # an alias of an earlier module's value: compared already
                        continue
                    relevant = call.relevant[oi] if call.relevant else None
                    row[k] = _compare_value(v, call.outputs[oi], relevant, perm, got[v], tolerance, labels[k], dims[k])
                    cks.append(row[k])
                per_module[m.order][k] = _worst(cks) if cks else None
                failing = failing or (m.path != "" and any(not c.ok for c in cks))
            return failing

        for k in range(len(labels)):
            t = time.perf_counter()
            capture = picked if k == pick else cap.run(data[k][0])
            seconds["framework"] += time.perf_counter() - t
            t = time.perf_counter()
            outs, got = picked_values if k == pick else runner.run(data[k], labels[k], dims[k])
            seconds["onnx"] += time.perf_counter() - t
            outputs_checks[k] = outs
            if got is None:
                failed_runs.append(labels[k])
                continue
            _check_rerun(spec, framework, capture, data[k][1], labels[k], tolerance, notes)
            t = time.perf_counter()
            if compare_case(k, capture, got) and relevant_only:
                compare_case(k, cap.run(data[k][0], relevance=True), got)
            seconds["compare"] = seconds.get("compare", 0.0) + time.perf_counter() - t
        picked = picked_values = None  # type: ignore[assignment]
    if failed_runs:
        notes.append(f"the instrumented copy failed to run at {', '.join(failed_runs)} (see the output checks)")
    flat_outputs = [c for cs in outputs_checks for c in cs]

    # 7. cones, inputs, first divergence
    results: list[ModuleCheck] = []
    first: tuple[int, int] | None = None  # (module order, case index)
    spans: dict[int, tuple[list[int], list[str]]] = {}
    for m in modules:
        if m.status != "compared":
            continue
        earlier = {v for v, o in value_owner.items() if o < m.order}
        own = [v for v in m.values if value_owner.get(v) == m.order]
        if not own:
            m.status = "alias"
            m.detail = f"same value as {modules[value_owner[m.values[0]]].path or ROOT_LABEL}"
            continue
        members: set[int] = set()
        boundary: set[str] = set()
        for v in own:
            nodes, stops = onnx_graph.cone(index, v, earlier)
            members |= set(nodes)
            boundary |= set(stops)
        spans[m.order] = (sorted(members), sorted(boundary, key=lambda v: index.producer.get(v, -1)))
        if first is None:  # modules are in execution order: the first one found is the first divergence
            for k, out_ck in enumerate(per_module[m.order]):
                if out_ck is not None and not out_ck.ok and all(_value_ok(checks, b, k, index) for b in spans[m.order][1]):
                    first = (m.order, k)
                    break
    for m in modules:
        case_checks = [c for c in per_module.get(m.order, []) if c is not None]
        worst = _worst(case_checks) if case_checks and m.status == "compared" else None
        members_l, boundary_l = spans.get(m.order, ([], []))
        in_abs: float | None = None
        inputs_ok: bool | None = None
        growth: float | None = None
        if worst is not None:
            k = labels.index(worst.case)
            in_checks = [checks[b][k] for b in boundary_l if b in checks and checks[b][k] is not None]
            in_abs = max((c.max_abs or 0.0 for c in in_checks), default=0.0)
            failing = [i for i, c in enumerate(per_module[m.order]) if c is not None and not c.ok]
            inputs_ok = all(_value_ok(checks, b, i, index) for b in boundary_l for i in failing)
            if worst.max_abs is not None and in_abs > 0:
                growth = float(worst.max_abs / in_abs)
        node_refs = tuple(
            NodeRef(index.nodes[i].name, index.nodes[i].op_type, scopes.get(index.nodes[i].name))
            for i in members_l
            if not _shape_arithmetic(index, index.nodes[i])
        )
        results.append(
            ModuleCheck(
                module=m.path,
                kind=m.kind,
                order=m.order,
                status=m.status,
                detail=m.detail,
                values=tuple(m.values if m.status in ("compared", "alias") else m.candidates),
                check=worst if m.status == "compared" else None,
                failing_cases=tuple(c.case for c in case_checks if not c.ok) if m.status == "compared" else (),
                inputs=tuple(boundary_l),
                input_max_abs=in_abs,
                inputs_ok=inputs_ok,
                growth=growth,
                nodes=node_refs,
                other_nodes=len(members_l) - len(node_refs),
                first=first is not None and first[0] == m.order,
            )
        )
    if first is None and any(not c.ok for c in flat_outputs):
        notes.append(
            "the outputs fail but no module's output leaves tolerance before them: the difference is in code "
            "outside every mapped module, or in onnxruntime's optimised graph (the instrumented copy runs unoptimised)"
            if runtime == "onnxruntime"
            else "the outputs fail but no module's output leaves tolerance before them"
        )
    unmapped = [m.path for m in modules if m.status in ("unmapped", "ambiguous")]
    if unmapped:
        notes.append(f"{len(unmapped)} module(s) could not be mapped to one ONNX value (see their status)")

    # 8. the first non-finite node
    t = time.perf_counter()
    nonfinite = _first_nonfinite(proto, onnx_file, index, modules, per_module, flat_outputs, data, labels, runtime, intra_op_threads, scopes)
    seconds["nonfinite"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return ExplainReport(
        model=spec.name,
        framework=framework,
        bundle=str(root),
        runtime=runtime,
        exporter=str(manifest.get("exporter", "")),
        mapping=mapping or "none",
        cases=tuple(labels),
        outputs=tuple(flat_outputs),
        modules=tuple(results),
        first=None if first is None else modules[first[0]].path,
        first_case=None if first is None else labels[first[1]],
        nonfinite=nonfinite,
        notes=tuple(notes),
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )


def _modules(
    order: Sequence[Any], by_path: Mapping[str, int], index: GraphIndex, scopes: Mapping[str, str | None], sep: str, mapped: bool
) -> list[_Module]:
    """One entry per module (first call), in execution order, with its candidate ONNX values
    (floating-point values made inside its scope and used outside it) or why it has none."""
    from exporter import onnx_graph

    modules: list[_Module] = []
    for c in order:
        if c.call:
            continue
        m = _Module(path=c.path, kind=c.kind, order=len(modules), calls=by_path[c.path])
        modules.append(m)
        if not c.outputs:
            m.status, m.detail = "unmapped", "no floating-point output"
        elif m.calls > 1:
            m.status, m.detail = "ambiguous", f"called {m.calls} times; the ONNX scopes do not tell the calls apart"
        elif c.path == "":
            m.candidates = list(index.graph_outputs)
        elif not mapped:
            m.status, m.detail = "unmapped", "no module scopes in the graph"
        else:
            members = {n.index for n in index.nodes if onnx_graph.in_scope(scopes.get(n.name), c.path, sep)}
            if not members:
                m.status, m.detail = "absent", "no ONNX node has this scope (fused into a neighbour or optimised away)"
            else:
                m.candidates = [v for v in index.leaving(members) if index.is_float(v) is not False]
                if not m.candidates:
                    m.status, m.detail = "unmapped", "no floating-point value leaves its scope"
    return modules


def _check_rerun(
    spec: ModelSpec, framework: str, capture: Capture, expected: Mapping[str, np.ndarray], label: str, tol: Any, notes: list[str]
) -> None:
    """Note (once) when the rebuilt framework model does not reproduce the bundle's test data."""
    from exporter.parity import compare

    root = capture.calls[-1] if capture.calls else None
    if root is None or root.path != "" or len(root.outputs) != len(spec.outputs) or any("does not reproduce" in n for n in notes):
        return
    again = dict(zip(spec.outputs, root.outputs))
    floats = {k: v for k, v in expected.items() if np.asarray(v).dtype.kind in "fc" and k in again}
    bad = [c for c in compare(floats, {k: again[k] for k in floats}, tol, case=label) if not c.ok]
    if bad:
        notes.append(
            f"the rebuilt {framework} model does not reproduce the bundle's test data at {label} ({bad[0].line()}); "
            "module errors are measured against the rebuilt model"
        )


def _known_ancestor(path: str, known: Mapping[str, int], sep: str) -> str:
    """The nearest enclosing module of ``path`` that ran (torch records attribute-only
    containers such as ``attention.self`` in a scope only through their children)."""
    while path and path not in known:
        path = path.rsplit(sep, 1)[0] if sep in path else ""
    return path


def _mapping_order(dims: Sequence[Mapping[str, int]]) -> list[int]:
    """Cases by how well their shapes tell values apart: most distinct dim sizes (fewest
    accidental shape coincidences) first, then the smallest."""

    def key(i: int) -> tuple[int, int]:
        sizes = [int(v) for v in dims[i].values()]
        return (-len({s for s in sizes if s > 1}), int(np.prod(sizes)) if sizes else 0)

    return sorted(range(len(dims)), key=key)


def _assign(m: _Module, outputs: Sequence[np.ndarray], got: Mapping[str, np.ndarray], index: GraphIndex, tol: Any) -> None:
    """Pick, for each framework output of ``m``, the candidate value of fitting shape.

    The root module's outputs are the graph outputs, in order.  Otherwise several fitting
    values are resolved when one of them depends on all the others (they are intermediate
    values also used outside the scope, and it is the last one computed), or else when
    exactly one of them matches the framework's output within tolerance (e.g. an
    attention's key and value caches, same shape); otherwise the module is ambiguous.
    """
    from exporter.onnx_graph import upstream

    if m.path == "":
        floats = [v for v in index.graph_outputs if v in got and np.asarray(got[v]).dtype.kind == "f"]
        if len(floats) == len(outputs) and all(np.shape(got[v]) == r.shape for v, r in zip(floats, outputs)):
            m.values, m.outputs = floats, list(range(len(outputs)))
            m.perms = [tuple(range(r.ndim)) for r in outputs]
            return
    used: set[str] = set()
    for oi, ref in enumerate(outputs):
        fits = []
        for v in m.candidates:
            if v in used or v not in got:
                continue
            perm = _layout(tuple(ref.shape), tuple(np.shape(got[v])))
            if perm is not None:
                fits.append((v, perm))
        exact = [f for f in fits if f[1] == tuple(range(len(f[1])))]
        if len(exact) == 1:  # a same-shape value beats a transposed one
            fits = exact
        if len(fits) > 1:
            last = [f for f in fits if {g[0] for g in fits if g is not f} <= upstream(index, f[0])]
            if len(last) == 1:
                fits = last
        if len(fits) > 1:
            matching = [f for f in fits if _compare_value(f[0], ref, None, f[1], got[f[0]], tol, "", {}).ok]
            if len(matching) == 1:
                fits = matching
        if len(fits) == 1:
            v, perm = fits[0]
            used.add(v)
            m.values.append(v)
            m.outputs.append(oi)
            m.perms.append(perm)
            if perm != tuple(range(len(perm))):
                m.detail = _perm_text(perm)
        elif len(outputs) > 1 and not fits:
            continue  # e.g. a tuple member the graph never uses
        elif not fits:
            m.status = "unmapped"
            shapes = ", ".join(f"{v} {tuple(np.shape(got[v]))}" for v in m.candidates if v in got)
            m.detail = f"no value leaving its scope has its output's shape {tuple(ref.shape)} (values: {shapes or '-'})"
            m.values, m.outputs, m.perms = [], [], []
            return
        else:
            m.status = "ambiguous"
            m.detail = f"{len(fits)} values leaving its scope fit its output {tuple(ref.shape)}: {', '.join(v for v, _ in fits)}"
            m.values, m.outputs, m.perms = [], [], []
            return
    if not m.values:
        m.status, m.detail = "unmapped", "no value leaving its scope fits its outputs"


def _compare_value(
    value: str,
    ref: np.ndarray,
    relevant: np.ndarray | None,
    perm: tuple[int, ...],
    got: np.ndarray,
    tol: Any,
    case: str,
    dims: Mapping[str, int],
) -> OutputCheck:
    """``exporter.parity.compare`` of one ONNX value with a framework output, in the ONNX
    layout, over the elements that reach the model's outputs (and every element where one
    side is non-finite and the other is not: NaN spreads even through a multiplication by 0)."""
    from dataclasses import replace

    from exporter.parity import compare

    if perm != tuple(range(len(perm))):
        ref = np.transpose(ref, perm)
        relevant = None if relevant is None else np.transpose(relevant, perm)
    got = np.asarray(got)
    if got.dtype != ref.dtype and _floating(got.dtype) and _floating(ref.dtype):
        # A reduced-precision variant (float16, bfloat16): compare in the framework's dtype
        # with the tolerance of the narrower one.
        narrow = got.dtype if got.dtype.itemsize < ref.dtype.itemsize else ref.dtype
        base = tol

        def tol(name: str, _dtype: str) -> Any:
            return base(name, str(narrow))

        got = got.astype(ref.dtype)
    if relevant is None or got.shape != ref.shape:
        (check,) = compare({value: ref}, {value: got}, tol, case=case, dims=dims)
        return check
    with np.errstate(invalid="ignore"):
        keep = relevant | (np.isfinite(ref) != np.isfinite(got))
    (check,) = compare({value: ref[keep]}, {value: got[keep]}, tol, case=case, dims=dims)
    return replace(check, shape=tuple(int(x) for x in ref.shape))


def _floating(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _value_ok(checks: Mapping[str, list[OutputCheck | None]], value: str, k: int, index: GraphIndex) -> bool:
    if value in index.graph_inputs:
        return True
    c = checks.get(value)
    return c is None or c[k] is None or c[k].ok  # type: ignore[union-attr]


def _session(path: Path, runtime: str, intra_op_threads: int | None, optimized: bool) -> Any:
    if runtime == "reference":
        from exporter.runtimes.reference import ReferenceRuntime

        return ReferenceRuntime(path)
    from exporter.runtimes.onnxruntime import OnnxRuntime

    return OnnxRuntime(path, intra_op_threads=intra_op_threads, graph_optimization_level="all" if optimized else "disable")


def _write_copy(model: Any, onnx_file: Path, tmp: Path) -> Path:
    """Save ``model`` into ``tmp`` with its external data files linked from beside ``onnx_file``."""
    import onnx

    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and not (tmp / loc).exists():
                src = (onnx_file.parent / loc).resolve()
                try:
                    os.symlink(src, tmp / loc)
                except OSError:  # no symlinks here: copy
                    import shutil

                    shutil.copyfile(src, tmp / loc)
    path = tmp / "explain.onnx"
    onnx.save(model, str(path))
    return path


class _OnnxRuns:
    """The bundle's model as is (its outputs: the verdict, as ``verify`` gets it) and an
    instrumented copy that also outputs every exposed value (optimisations off), both open
    for the duration of a ``with`` block; the copy lives in a temp directory."""

    def __init__(
        self, proto: Any, onnx_file: Path, index: GraphIndex, exposed: Sequence[str], runtime: str,
        intra_op_threads: int | None, tolerance: Any,
    ) -> None:  # fmt: skip
        self._args = (proto, onnx_file, index, exposed)
        self.runtime = runtime
        self.threads = intra_op_threads
        self.tolerance = tolerance
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._plain: Any = None
        self._copy: Any = None

    def __enter__(self) -> _OnnxRuns:
        from exporter import onnx_graph

        proto, onnx_file, index, exposed = self._args
        self._tmp = tempfile.TemporaryDirectory(prefix="exporter-explain-")
        try:
            if self.runtime == "onnxruntime":
                self._plain = _session(onnx_file, self.runtime, self.threads, optimized=True)
            path = _write_copy(onnx_graph.with_outputs(proto, exposed, index), onnx_file, Path(self._tmp.name))
            self._copy = _session(path, self.runtime, self.threads, optimized=False)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for rt in (self._plain, self._copy):
            if rt is not None:
                rt.close()
        self._plain = self._copy = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def run(
        self, case: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], label: str, dims: Mapping[str, int]
    ) -> tuple[list[OutputCheck], dict[str, np.ndarray] | None]:
        """``(output checks against the test data, every value of the copy or None if it failed)``."""
        from exporter.errors import RunError
        from exporter.parity import compare, run_and_compare
        from exporter.runtimes.base import check_arrays

        inputs, expected = case
        checks: list[OutputCheck] = []
        if self._plain is not None:
            checks = run_and_compare(self._plain, inputs, expected, self.tolerance, case=label, dims=dims)
        # A model that cannot take the case (an export that fixed the batch dim) or fails
        # to run it: the output checks say how; there are no values to compare.
        got: dict[str, np.ndarray] | None = None
        if not check_arrays(self._copy.inputs, inputs)[1]:
            try:
                got = self._copy.run(inputs)
            except RunError:
                got = None
        if got is None:
            if self._plain is None:
                checks = run_and_compare(self._copy, inputs, expected, self.tolerance, case=label, dims=dims)
            return checks, None
        if self._plain is None:
            checks = compare(expected, {k: got[k] for k in expected if k in got}, self.tolerance, case=label, dims=dims)
        return checks, got


def _first_nonfinite(
    proto: Any,
    onnx_file: Path,
    index: GraphIndex,
    modules: Sequence[_Module],
    per_module: Mapping[int, Sequence[OutputCheck | None]],
    outputs_checks: Sequence[OutputCheck],
    data: Sequence[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    labels: Sequence[str],
    runtime: str,
    intra_op_threads: int | None,
    scopes: Mapping[str, str | None],
) -> NonFinite | None:
    """The first node making NaN/Inf from finite inputs, where a value has non-finite
    elements the framework's has not; None when no value does."""
    from exporter import onnx_graph

    target: tuple[str | None, list[str], int] | None = None
    for m in modules:
        cks = per_module.get(m.order) or []
        for k, c in enumerate(cks):
            if c is not None and c.nan_mismatch and m.status == "compared":
                target = (m.path, list(m.values), k)
                break
        if target:
            break
    if target is None:
        bad = [c for c in outputs_checks if c.nan_mismatch]
        if not bad:
            return None
        target = (None, [bad[0].output], labels.index(bad[0].case))
    module, targets, k = target
    members: set[int] = set()
    for v in targets:
        members |= set(onnx_graph.cone(index, v, ())[0])
    exposed = [o for i in sorted(members) for o in index.nodes[i].outputs if o and index.is_float(o)]
    with tempfile.TemporaryDirectory(prefix="exporter-explain-") as tmp_s:
        path = _write_copy(onnx_graph.with_outputs(proto, exposed, index), onnx_file, Path(tmp_s))
        rt = _session(path, runtime, intra_op_threads, optimized=False)
        try:
            got = rt.run(data[k][0])
        finally:
            rt.close()
    known = {**data[k][0], **got}
    consts = _constant_values(proto, index)
    for i in sorted(members):
        node = index.nodes[i]
        ins = [u for u in node.inputs if u]
        if any(not _finite(known.get(u, consts.get(u))) for u in ins):
            continue
        for o in node.outputs:
            a = got.get(o)
            if a is None or a.dtype.kind not in "fc":
                continue
            nan = int(np.isnan(a).sum())
            inf = int(np.isinf(a).sum())
            if nan or inf:
                kind = "NaN and Inf" if nan and inf else ("NaN" if nan else "Inf")
                return NonFinite(
                    case=labels[k], node=node.name, op_type=node.op_type, scope=scopes.get(node.name), value=o,
                    kind=kind, count=nan + inf, total=int(a.size), module=module,
                )  # fmt: skip
    return None


def _finite(a: Any) -> bool:
    if a is None:
        return True  # an external initializer not loaded here: a weight, assumed finite
    a = np.asarray(a)
    return a.dtype.kind not in "fc" or bool(np.isfinite(a).all())


def _constant_values(proto: Any, index: GraphIndex) -> dict[str, np.ndarray]:
    """Inline initializers and Constant-node values (external ones are skipped)."""
    import onnx
    from onnx import numpy_helper

    out: dict[str, np.ndarray] = {}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            out[t.name] = numpy_helper.to_array(t)
    for n in proto.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out
