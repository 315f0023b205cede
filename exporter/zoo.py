"""Verify an ONNX model-zoo directory that exporter did not write (no ``manifest.json``).

The layout is the one exporter's bundles use, and the one the ONNX model zoo, onnx's own
backend test data and onnxruntime's ``onnx_test_runner`` read::

    DIR/model.onnx
    DIR/test_data_set_<k>/input_<i>.pb   TensorProto, SequenceProto or OptionalProto
    DIR/test_data_set_<k>/output_<i>.pb  the expected outputs

:func:`verify_dir` runs every data set in a runtime and judges the outputs with
:func:`exporter.parity.compare`, like a bundle, with these differences:

* **tolerances**: there is no manifest, so each output gets exporter's dtype-aware
  defaults (:data:`exporter.models.registry.DEFAULT_TOLERANCES`: float32 atol 1e-5,
  rtol 1e-4; float64 1e-10/1e-8; integers, bools and strings exact), which ``atol`` /
  ``rtol`` / ``output_tolerances`` override;
* **which file is which input**: ``input_<i>.pb`` goes to the graph input its
  TensorProto names, or, when the name is empty or not a graph input, to the ``i``-th
  graph input (initializers are not inputs); the same for outputs;
* **values**: numeric and string tensors, sequences (``SequenceProto``: compared element
  by element, ``out[0]``, ``out[1]``...) and optionals (``OptionalProto``: empty must
  match empty).  Sequences, optionals and strings run in onnxruntime only (the other
  runtimes take numeric tensors); numeric models run in any runtime.

The verdict follows onnxruntime's test runner: :attr:`ZooReport.exit_code` is 0 when
every output of every data set is within tolerance, 1 when one is not, and 2 when the
runtime cannot load the model or run a data set (:attr:`ZooReport.errors` says why; the
cases that did run are still judged).  A directory that is not a model-zoo directory
(no model.onnx, no data sets, unreadable files, more files than the graph has inputs)
raises :class:`~exporter.errors.BundleError`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.errors import BundleError, RunError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import Tolerance
    from exporter.parity import OutputCheck, ParityReport

__all__ = [
    "MODEL_FILE",
    "ZooReport",
    "is_zoo_dir",
    "find_zoo_dirs",
    "read_value",
    "read_data_set",
    "verify_dir",
]

MODEL_FILE = "model.onnx"
_SET = re.compile(r"^test_data_set_(\d+)$")
_PB = re.compile(r"^(input|output)_(\d+)\.pb$")
_OPTIONAL_FIELDS = ("tensor_value", "sparse_tensor_value", "sequence_value", "map_value", "optional_value")


# --------------------------------------------------------------------------- finding
def _data_sets(d: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _SET.match(p.name))]
    return [p for _, p in sorted(found)]


def is_zoo_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a model-zoo directory: ``model.onnx`` and at least one
    ``test_data_set_<k>/``, and no exporter ``manifest.json`` (that is a bundle)."""
    d = Path(path)
    return d.is_dir() and (d / MODEL_FILE).is_file() and not (d / "manifest.json").exists() and bool(_data_sets(d))


def find_zoo_dirs(root: str | os.PathLike[str]) -> list[Path]:
    """Model-zoo directories at or below ``root`` (any depth), sorted.

    Raises:
        UsageError: ``root`` does not exist or holds none.
    """
    r = Path(root)
    if not r.exists():
        raise UsageError(f"{str(r)!r} does not exist; pass a directory holding model.onnx and test_data_set_<k>/")
    if is_zoo_dir(r):
        return [r]
    found = sorted({m.parent for m in r.rglob(MODEL_FILE) if is_zoo_dir(m.parent)})
    if not found:
        raise UsageError(
            f"{str(r)!r} holds no model-zoo directory (model.onnx beside test_data_set_<k>/input_<i>.pb, output_<i>.pb)"
        )
    return found


# --------------------------------------------------------------------------- values
def _kind(type_proto: Any) -> str:
    """``tensor``, ``sequence``, ``optional``, ``map`` or ``sparse_tensor``."""
    kind = type_proto.WhichOneof("value") or "tensor_type"
    return kind.removesuffix("_type")


def read_value(path: str | os.PathLike[str], kind: str = "tensor") -> tuple[str, Any]:
    """Read one ``.pb`` file of a data set.

    Args:
        path: the file.
        kind: what the graph expects there: ``"tensor"`` (TensorProto), ``"sequence"``
            (SequenceProto) or ``"optional"`` (OptionalProto).

    Returns:
        ``(name stored in the file, value)``: an ``np.ndarray`` (strings as an object
        array), a list of values, or ``None`` for an empty optional.

    Raises:
        BundleError: the file is not a valid proto of that kind, or of a kind not supported.
    """
    import onnx
    from onnx import numpy_helper

    protos = {"tensor": onnx.TensorProto, "sequence": onnx.SequenceProto, "optional": onnx.OptionalProto}
    p = Path(path)
    if kind not in protos:
        raise BundleError(f"{p}: the graph expects a {kind} value here; exporter reads tensors, sequences and optionals")
    proto = protos[kind]()
    try:
        proto.ParseFromString(p.read_bytes())
        if kind == "tensor":
            value: Any = numpy_helper.to_array(proto)
        elif kind == "sequence":
            value = numpy_helper.to_list(proto)
        elif any(proto.HasField(f) for f in _OPTIONAL_FIELDS):
            value = numpy_helper.to_optional(proto)
        else:  # an empty optional (onnx's to_optional cannot read one)
            value = None
    except Exception as e:  # protobuf DecodeError and friends: bytes we did not write
        raise BundleError(f"{p} is not a valid ONNX {type(proto).__name__} ({type(e).__name__}: {e})") from e
    return proto.name, value


def _assign(files: list[Path], graph_values: list[Any], what: str, d: Path) -> dict[str, Any]:
    """Read ``files`` (input_<i>.pb or output_<i>.pb, in index order) and key them by graph name."""
    names = [v.name for v in graph_values]
    kinds = {v.name: _kind(v.type) for v in graph_values}
    out: dict[str, Any] = {}
    problems = []
    for i, f in enumerate(files):
        by_order = names[i] if i < len(names) else None
        stored, value = read_value(f, kinds[by_order] if by_order else "tensor")
        target = stored if stored in kinds else by_order
        if target is None:
            problems.append(f"{f.name}: the model has only {len(names)} {what}s ({', '.join(names)}) and the file's name {stored!r} is none of them")
            continue
        if target != by_order and kinds[target] != (kinds[by_order] if by_order else "tensor"):
            stored, value = read_value(f, kinds[target])
        if target in out:
            problems.append(f"{f.name}: a second value for {what} {target!r}")
            continue
        out[target] = value
    if problems:
        raise BundleError.listing(f"test data set {d} does not fit the model", problems)
    return out


def read_data_set(directory: str | os.PathLike[str], model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One data set's inputs and expected outputs, keyed by the graph's names.

    Args:
        directory: the ``test_data_set_<k>`` directory.
        model: the ``onnx.ModelProto`` (its graph says what each file holds).

    Returns:
        ``(inputs, outputs)``; outputs in the graph's order.

    Raises:
        BundleError: no inputs, unreadable files, files that fit no graph value.
    """
    d = Path(directory)
    files: dict[str, list[tuple[int, Path]]] = {"input": [], "output": []}
    for p in d.iterdir():
        if m := _PB.match(p.name):
            files[m.group(1)].append((int(m.group(2)), p))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    graph_inputs = [v for v in graph.input if v.name not in initializers]
    if not files["input"] and graph_inputs:
        raise BundleError(f"test data set {d} has no input_<i>.pb files; the model takes {', '.join(v.name for v in graph_inputs)}")
    inputs = _assign([p for _, p in sorted(files["input"])], graph_inputs, "input", d)
    outputs = _assign([p for _, p in sorted(files["output"])], list(graph.output), "output", d)
    order = [v.name for v in graph.output]
    return inputs, {k: outputs[k] for k in order if k in outputs}


# --------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ZooReport:
    """The verdict on one model-zoo directory.

    Attributes:
        path: the directory.
        runtime: the runtime that ran it.
        parity: every check of every data set that ran (a ``ParityReport``).
        errors: why the runtime could not load the model or run a data set (one line
            each); non-empty means exit code 2.
        settings: the runtime's session settings, when it has them.
        hints: the runtime's own explanation of the failures and the fix (e.g. OpenVINO's
            lowered default precision), when it has one.
        seconds: wall time.
    """

    path: Path
    runtime: str
    parity: ParityReport
    errors: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    hints: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors and self.parity.ok

    def __bool__(self) -> bool:
        return self.ok

    @property
    def exit_code(self) -> int:
        """0 pass, 1 out of tolerance, 2 the runtime could not load or run it."""
        return 2 if self.errors else 0 if self.parity.ok else 1

    @property
    def verdict(self) -> str:
        return ("PASS", "FAIL", "ERROR")[self.exit_code]

    def failures(self) -> list[str]:
        """Every error, then every failing check, then the runtime's hints."""
        lines = list(self.errors) + (self.parity.failures() if not self.parity.ok and self.parity.checks else [])
        return lines + [f"hint: {h}" for h in self.hints] if lines else lines

    def summary(self) -> str:
        """``"DIR: PASS in onnxruntime, 2 checks over 1 data sets"``."""
        bad = len(self.parity.failed_checks())
        tail = f", {bad} out of tolerance" if bad else ""
        tail += f", {len(self.errors)} error(s)" if self.errors else ""
        return (
            f"{self.path}: {self.verdict} in {self.runtime}, {len(self.parity.checks)} checks over "
            f"{len(self.parity.cases)} data sets{tail}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "exporter-zoo-verify",
            "path": str(self.path),
            "runtime": self.runtime,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "verdict": self.verdict,
            "errors": list(self.errors),
            "settings": dict(self.settings),
            "hints": list(self.hints),
            "seconds": round(self.seconds, 3),
            "parity": self.parity.to_dict(),
        }


# --------------------------------------------------------------------------- comparing values
def _is_numeric(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype != object


def _exact_check(name: str, case: str, ref: np.ndarray, cand: Any) -> OutputCheck:
    """String tensors: equal element by element."""
    from exporter.parity import OutputCheck

    shape = tuple(int(s) for s in ref.shape)
    reason = ""
    n_bad = int(ref.size)
    c = np.asarray(cand) if cand is not None else None
    if c is None:
        reason = "missing from the candidate"
    elif c.shape != ref.shape:
        reason = f"shape {tuple(c.shape)}, expected {shape}"
    else:
        n_bad = int(np.sum(ref.astype(object) != c.astype(object)))
    return OutputCheck(
        output=name, case=case, dims={}, shape=shape, dtype="string", atol=0.0, rtol=0.0, rel_floor=1.0,
        max_abs=None, max_rel=None, mean_abs=None, p99_abs=None, n_bad=n_bad, n_total=int(ref.size),
        nan_mismatch=0, ok=not reason and n_bad == 0, reason=reason,
    )  # fmt: skip


def _kind_check(name: str, case: str, reason: str) -> OutputCheck:
    from exporter.parity import OutputCheck

    return OutputCheck(
        output=name, case=case, dims={}, shape=None, dtype="value", atol=0.0, rtol=0.0, rel_floor=1.0,
        max_abs=None, max_rel=None, mean_abs=None, p99_abs=None, n_bad=0, n_total=0, nan_mismatch=0,
        ok=not reason, reason=reason,
    )  # fmt: skip


def _compare_value(name: str, ref: Any, cand: Any, tol: Callable[[str, str], Tolerance], case: str) -> list[OutputCheck]:
    from exporter.parity import compare

    if isinstance(ref, list):  # a sequence: same length, then element by element
        if not isinstance(cand, list):
            return [_kind_check(name, case, f"a {type(cand).__name__}, expected a sequence of {len(ref)}")]
        if len(cand) != len(ref):
            return [_kind_check(name, case, f"a sequence of {len(cand)}, expected {len(ref)}")]
        checks = []
        for k, (r, c) in enumerate(zip(ref, cand)):
            checks += _compare_value(f"{name}[{k}]", r, c, lambda _o, dt: tol(name, dt), case)
        return checks or [_kind_check(name, case, "")]  # two empty sequences match
    if ref is None:  # an empty optional
        return [_kind_check(name, case, "" if cand is None else "a value, expected an empty optional")]
    if cand is None:
        return [_kind_check(name, case, "an empty optional, expected a value")]
    if isinstance(ref, np.ndarray) and ref.dtype == object:
        return [_exact_check(name, case, ref, cand)]
    return compare({name: ref}, {name: cand}, tol, case=case)


# --------------------------------------------------------------------------- running
class _OrtValues:
    """onnxruntime on whole ONNX values (sequences, optionals, strings), which exporter's
    Runtime interface, made for numeric tensors, does not take."""

    name = "onnxruntime"

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own Fail / InvalidGraph / NotImplemented types
            raise RunError(f"runtime 'onnxruntime' ({path}): cannot load the model: {type(e).__name__}: {' '.join(str(e).split())}") from e
        self.outputs = tuple(o.name for o in self._session.get_outputs())

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        try:
            values = self._session.run(list(self.outputs), dict(inputs))
        except Exception as e:  # onnxruntime's own error types
            raise RunError(f"runtime 'onnxruntime': failed to run: {type(e).__name__}: {' '.join(str(e).split())}") from e
        return dict(zip(self.outputs, values, strict=True))

    def session_options(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"onnxruntime_version": ort.__version__, "providers": self._session.get_providers(), "values": "sequences/optionals/strings"}

    def close(self) -> None:
        self._session = None


def _numeric_tensors_only(model: Any) -> bool:
    from onnx import TensorProto

    initializers = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers] + list(model.graph.output)
    return all(_kind(v.type) == "tensor" and v.type.tensor_type.elem_type != TensorProto.STRING for v in values)


def verify_dir(
    path: str | os.PathLike[str],
    runtime: str = "onnxruntime",
    *,
    atol: float | None = None,
    rtol: float | None = None,
    output_tolerances: Mapping[str, Any] | None = None,
    **runtime_kwargs: Any,
) -> ZooReport:
    """Run every data set of a model-zoo directory and judge it (see the module docstring).

    Args:
        path: the directory (``model.onnx`` + ``test_data_set_<k>/``).
        runtime: a runtime name (``onnxruntime``, ``reference``, ``openvino``, ...).
        atol, rtol: override the dtype defaults for every float output.
        output_tolerances: per-output overrides (``{"y": (1e-3, 1e-3)}``).
        **runtime_kwargs: passed to the runtime.

    Returns:
        The :class:`ZooReport`; ``exit_code`` is the verdict (0 / 1 / 2).

    Raises:
        BundleError: not a model-zoo directory, or unreadable / ill-fitting test data.
        UsageError: bad tolerances, an unknown runtime.
        MissingDependencyError: the runtime is not installed.
    """
    import onnx

    from exporter import parity
    from exporter.runtimes.base import load_runtime

    t0 = time.perf_counter()
    d = Path(path)
    if not d.is_dir() or not (d / MODEL_FILE).is_file():
        raise BundleError(f"{str(d)!r} is not a model-zoo directory: {MODEL_FILE} is missing; pass DIR holding model.onnx and test_data_set_<k>/")
    sets = _data_sets(d)
    if not sets:
        raise BundleError(f"{str(d)!r} has no test_data_set_<k>/ directories beside {MODEL_FILE}")
    tol = parity.tolerance_for(None, atol=atol, rtol=rtol, output_tolerances=output_tolerances)
    try:
        model = onnx.load(str(d / MODEL_FILE), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise BundleError(f"{d / MODEL_FILE} is not a readable ONNX model ({type(e).__name__}: {e})") from e
    data = [(s.name, *read_data_set(s, model)) for s in sets]  # read everything before running anything
    numeric = _numeric_tensors_only(model)
    del model

    errors: list[str] = []
    checks: list[OutputCheck] = []
    settings: dict[str, Any] = {}
    hints: list[str] = []
    rt: Any = None
    try:
        if numeric:
            rt = load_runtime(runtime, str(d / MODEL_FILE), **runtime_kwargs)
        elif runtime in ("onnxruntime", "ort"):
            if runtime_kwargs:
                raise UsageError(f"runtime options {sorted(runtime_kwargs)} are not supported for models with sequence, optional or string values")
            rt = _OrtValues(d / MODEL_FILE)
        else:
            raise RunError(
                f"runtime {runtime!r} takes numeric tensors only, and {d / MODEL_FILE} has sequence, optional or string "
                "inputs/outputs; use runtime 'onnxruntime'"
            )
    except RunError as e:
        errors.append(str(e))
    if rt is not None:
        try:
            settings = dict(rt.session_options()) if hasattr(rt, "session_options") else {}
            for case, inputs, expected in data:
                try:
                    got = rt.run(inputs)
                except (RunError, UsageError) as e:  # the runtime failed, or the data set does not fit the model
                    errors.append(f"{case}: {e}")
                    continue
                # Outputs without a file are not judged (zoo data sets may hold only some).
                for name, ref in expected.items():
                    if name in got:
                        checks += _compare_value(name, ref, got[name], tol, case)
                    else:
                        checks.append(_kind_check(name, case, f"missing from the candidate (it has: {', '.join(got) or 'nothing'})"))
            explain = getattr(rt, "failure_hints", None)
            failed = [c for c in checks if not c.ok]
            if failed and explain is not None:
                hints = list(explain(failed))
        finally:
            rt.close()
    report = parity.ParityReport(
        model=d.name,
        framework="model-zoo",
        reference="test data",
        candidate=getattr(rt, "name", runtime),
        checks=tuple(checks),
    )
    return ZooReport(
        path=d, runtime=report.candidate, parity=report, errors=tuple(errors), settings=settings, hints=tuple(hints),
        seconds=time.perf_counter() - t0,
    )
