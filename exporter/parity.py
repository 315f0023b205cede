"""The parity verdict: compare a candidate runtime's outputs with a reference's, strictly.

    check(spec, reference, candidate)          one ParityReport over a sweep of input sizes
      └── for each case (batch=1, 2, 7, 64; user .npz inputs)
            compare(reference_out, candidate_out, tolerance_for) -> [OutputCheck per output]

An element passes when ``|c - r| <= atol + rtol * |r|`` (computed in float64).  The
verdict is strict: one element of one output out of tolerance at one case fails the
report, and the failure message names every failing (output, case) with the errors seen
and the tolerance used.

Rules, each a failure regardless of tolerance:

* a NaN/Inf mismatch: non-finite values must match exactly (NaN where the reference has
  NaN, +Inf where +Inf); matching non-finite values count as equal;
* integer and bool outputs differ anywhere (they are compared exactly; tolerances are 0);
* an output missing from the candidate, an extra output, a shape mismatch, or a dtype
  mismatch (differing integer widths are allowed: the values are compared exactly);
* the candidate failing to run a case (e.g. a batch size baked into a Reshape): an
  adapter's ``RunError``.  Any other exception (a bug, a failing reference) propagates.

Error statistics per (output, case), over the elements finite in both:
``max_abs``, ``mean_abs``, ``p99_abs`` (99th percentile of ``|c - r|``), ``max_rel``,
``n_bad`` (elements out of tolerance, NaN/Inf mismatches included), ``nan_mismatch``.

**Relative error floor.**  ``max_rel = max |c - r| / max(|r|, floor)`` with
``floor = atol / rtol`` (for ``rtol > 0``; ``atol`` when ``rtol == 0``; never below the
dtype's smallest normal number, 1 for integers).  ``atol / rtol`` is the magnitude where
the tolerance turns from absolute-dominated to relative-dominated: below it, the check
is governed by ``atol`` and a relative error is meaningless (it would blow up near zero).
With this floor, and ``atol, rtol > 0``, the number reads directly against the tolerance:
``max_rel <= rtol`` implies the output passes, and a passing output always has
``max_rel < 2 * rtol``.  For the float32 default (atol 1e-5, rtol 1e-4) the floor is 0.1.

Tolerances come from one function, :func:`tolerance_for`: a bundle's recorded table
(per-output, per-dtype) or ``spec.tolerance(output, dtype)`` (per-output, then per-dtype,
then the defaults); ``atol``/``rtol`` arguments override those, and ``output_tolerances``
arguments override everything for the outputs they name.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.errors import ParityError, RunError, UsageError, format_problems

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec, Tolerance
    from exporter.runtimes.base import Runtime

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "REPORT_FORMAT",
    "OutputCheck",
    "ParityReport",
    "compare",
    "relative_floor",
    "tolerance_for",
    "sweep_cases",
    "case_label",
    "load_inputs",
    "run_and_compare",
    "check",
    "check_runs",
    "plan_runs",
]

#: Batch sizes of the default sweep: 1 and 2 (the usual export shapes), 7 (odd, catches a
#: batch baked into a Reshape), 64 (a larger one).
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 7, 64)
REPORT_FORMAT = "exporter-parity"
REPORT_FORMAT_VERSION = 1
_MAX_REASON = 600


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _exact_dtype(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_))


@dataclass(frozen=True)
class OutputCheck:
    """The comparison of one output at one case.

    Attributes:
        output: output name.
        case: case label (``"batch=7"``, ``"batch=2,seq=16"``, ``"inputs.npz"``).
        dims: sizes of the dynamic dims at this case.
        shape: the reference's shape (the candidate's for an extra output).
        dtype: the reference's dtype name.
        atol, rtol: the tolerance used (0 for integer/bool outputs).
        rel_floor: the floor of ``max_rel``'s denominator (see the module docstring).
        max_abs, max_rel, mean_abs, p99_abs: error statistics over the elements finite in
            both; ``None`` when nothing could be compared (missing output, shape mismatch).
        n_bad: elements out of tolerance (NaN/Inf mismatches included; all elements when
            nothing could be compared).
        n_total: elements in the output.
        nan_mismatch: elements where the non-finite values differ (always a failure).
        ok: this output passes at this case.
        reason: why it failed beyond the numbers (missing output, shape or dtype mismatch,
            candidate failed to run); empty otherwise.
        worst_tol: the largest ``|c - r| / (atol + rtol * |r|)`` over the elements finite in
            both: the worst error as a fraction of its own tolerance (an element passes at
            <= 1); ``None`` for integer/bool outputs and when nothing could be compared.
    """

    output: str
    case: str
    dims: dict[str, int]
    shape: tuple[int, ...] | None
    dtype: str
    atol: float
    rtol: float
    rel_floor: float
    max_abs: float | None
    max_rel: float | None
    mean_abs: float | None
    p99_abs: float | None
    n_bad: int
    n_total: int
    nan_mismatch: int
    ok: bool
    reason: str = ""
    worst_tol: float | None = None

    def __bool__(self) -> bool:
        return self.ok

    @property
    def label(self) -> str:
        """``"y @ batch=7"``."""
        return f"{self.output} @ {self.case}" if self.case else self.output

    def line(self) -> str:
        """One readable line: the errors seen and the tolerance used."""
        parts = []
        if self.reason:
            parts.append(self.reason)
        if self.max_abs is not None:
            parts.append(
                f"max_abs {_fmt(self.max_abs)}, max_rel {_fmt(self.max_rel)}, mean_abs {_fmt(self.mean_abs)}, "
                f"p99_abs {_fmt(self.p99_abs)}, {self.n_bad}/{self.n_total} elements out of tolerance, "
                f"{self.nan_mismatch} NaN/Inf mismatches"
            )
        parts.append(f"tolerance atol={self.atol:g} rtol={self.rtol:g} ({self.dtype})")
        return f"{self.label}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "case": self.case,
            "dims": dict(self.dims),
            "shape": None if self.shape is None else list(self.shape),
            "dtype": self.dtype,
            "atol": self.atol,
            "rtol": self.rtol,
            "rel_floor": self.rel_floor,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "mean_abs": self.mean_abs,
            "p99_abs": self.p99_abs,
            "n_bad": self.n_bad,
            "n_total": self.n_total,
            "nan_mismatch": self.nan_mismatch,
            "ok": self.ok,
            "reason": self.reason,
            "worst_tol": self.worst_tol,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutputCheck:
        """Inverse of :meth:`to_dict` (e.g. after ``json.loads``)."""
        values = dict(d)
        values["dims"] = {str(k): int(v) for k, v in values["dims"].items()}
        values["shape"] = None if values["shape"] is None else tuple(int(x) for x in values["shape"])
        return cls(**values)


@dataclass(frozen=True)
class ParityReport:
    """The verdict of one candidate against one reference over every case.

    ``bool(report)`` is the verdict: True only when there is at least one check and every
    check passes.
    """

    model: str
    framework: str
    reference: str
    candidate: str
    checks: tuple[OutputCheck, ...]
    seed: int | None = None
    #: The candidate runtime's own explanation of the failures, with the fix
    #: (``Runtime.failure_hints``: e.g. OpenVINO's lowered default precision).
    hints: tuple[str, ...] = ()
    #: The candidate runtime's settings (its ``session_options()``; runtime options included).
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def cases(self) -> list[str]:
        """Case labels in the order they were run."""
        return list(dict.fromkeys(c.case for c in self.checks))

    @property
    def outputs(self) -> list[str]:
        return list(dict.fromkeys(c.output for c in self.checks))

    def failed_checks(self) -> list[OutputCheck]:
        """Failing checks sorted by output name, then case in run order."""
        order = {case: i for i, case in enumerate(self.cases)}
        return sorted((c for c in self.checks if not c.ok), key=lambda c: (c.output, order[c.case]))

    def failures(self) -> list[str]:
        """One line per failing (output, case): the errors seen and the tolerance used.

        Sorted by output name, then by case in run order (``batch=7`` before ``batch=64``).
        """
        lines = [c.line() for c in self.failed_checks()]
        if not self.checks:
            lines.append("no outputs were compared (no cases were run)")
        return lines

    def summary(self) -> str:
        """``"mlp (torch): onnxruntime vs torch: PASS, 8 checks over 4 cases"``."""
        verdict = "PASS" if self.ok else "FAIL"
        bad = len(self.failed_checks())
        tail = f", {bad} failing" if bad else ""
        return (
            f"{self.model} ({self.framework}): {self.candidate} vs {self.reference}: {verdict}, "
            f"{len(self.checks)} checks over {len(self.cases)} cases{tail}"
        )

    def raise_for_failure(self) -> ParityReport:
        """Raise ``ParityError`` naming every failing output and case; return ``self`` when it passes.

        Raises:
            ParityError: the report fails.
        """
        if self.ok:
            return self
        header = (
            f"parity failed for model {self.model!r} ({self.framework}): {self.candidate} vs {self.reference}, "
            f"{len(self.failed_checks())} of {len(self.checks)} (output, case) checks out of tolerance. "
            "If the difference is expected (e.g. reduced precision), loosen the tolerance (--atol/--rtol or a "
            "per-output override in the model spec, with a comment saying why); otherwise the export is wrong"
        )
        lines = self.failures() + [f"hint: {h}" for h in self.hints]
        raise ParityError(header + "".join(f"\n  - {line}" for line in lines))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (``json.dumps`` needs no help; no NaN or Inf)."""
        return {
            "format": REPORT_FORMAT,
            "format_version": REPORT_FORMAT_VERSION,
            "model": self.model,
            "framework": self.framework,
            "reference": self.reference,
            "candidate": self.candidate,
            "seed": self.seed,
            "ok": self.ok,
            "cases": self.cases,
            "checks": [c.to_dict() for c in self.checks],
            "failures": self.failures() if not self.ok else [],
            "hints": list(self.hints),
            "settings": dict(self.settings),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParityReport:
        """Inverse of :meth:`to_dict`.

        Raises:
            UsageError: ``d`` is not a parity report.
        """
        if d.get("format") != REPORT_FORMAT:
            raise UsageError(f"not a parity report: format is {d.get('format')!r}, expected {REPORT_FORMAT!r}")
        return cls(
            model=d["model"],
            framework=d["framework"],
            reference=d["reference"],
            candidate=d["candidate"],
            checks=tuple(OutputCheck.from_dict(c) for c in d["checks"]),
            seed=d.get("seed"),
            hints=tuple(d.get("hints", ())),
            settings=dict(d.get("settings") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> ParityReport:
        return cls.from_dict(json.loads(text))

    def to_junit_xml(self) -> str:
        """JUnit XML: one testsuite, one testcase per (case, output), a ``<failure>`` for each failing one."""
        failed = [c for c in self.checks if not c.ok]
        suite_name = f"parity.{self.model}.{self.framework}"
        root = ET.Element(
            "testsuites", name="exporter parity", tests=str(len(self.checks)), failures=str(len(failed)), errors="0"
        )
        suite = ET.SubElement(
            root,
            "testsuite",
            name=suite_name,
            tests=str(len(self.checks)),
            failures=str(len(failed)),
            errors="0",
            skipped="0",
        )
        props = ET.SubElement(suite, "properties")
        for key in ("model", "framework", "reference", "candidate", "seed"):
            ET.SubElement(props, "property", name=key, value=str(getattr(self, key)))
        for c in self.checks:
            tc = ET.SubElement(
                suite,
                "testcase",
                classname=f"{suite_name}.{self.candidate}",
                name=f"{c.output}[{c.case}]" if c.case else c.output,
                time="0",
            )
            if not c.ok:
                failure = ET.SubElement(tc, "failure", message=c.line(), type="ParityError")
                failure.text = json.dumps(c.to_dict(), indent=2, allow_nan=False)
        if not self.checks:
            tc = ET.SubElement(suite, "testcase", classname=f"{suite_name}.{self.candidate}", name="no-cases", time="0")
            ET.SubElement(tc, "failure", message="no outputs were compared (no cases were run)", type="ParityError")
            root.set("tests", "1")
            root.set("failures", "1")
            suite.set("tests", "1")
            suite.set("failures", "1")
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"

    def table(self) -> str:
        """A readable text table, one row per (output, case), with the summary on top."""
        header = (
            "output",
            "case",
            "shape",
            "dtype",
            "max_abs",
            "max_rel",
            "mean_abs",
            "p99_abs",
            "bad",
            "nan/inf",
            "atol",
            "rtol",
            "verdict",
        )
        rows = [header]
        for c in self.checks:
            rows.append(
                (
                    c.output,
                    c.case,
                    "-" if c.shape is None else "x".join(map(str, c.shape)) or "scalar",
                    c.dtype,
                    _fmt(c.max_abs),
                    _fmt(c.max_rel),
                    _fmt(c.mean_abs),
                    _fmt(c.p99_abs),
                    f"{c.n_bad}/{c.n_total}",
                    str(c.nan_mismatch),
                    f"{c.atol:g}",
                    f"{c.rtol:g}",
                    "ok" if c.ok else "FAIL" + (f" ({c.reason})" if c.reason else ""),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = [self.summary()]
        for r in rows:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
        lines += [f"  hint: {h}" for h in self.hints]
        return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------


def relative_floor(atol: float, rtol: float, dtype: str | np.dtype) -> float:
    """The floor of the denominator of the relative error (see the module docstring).

    Args:
        atol, rtol: the tolerance.
        dtype: the reference's dtype.

    Returns:
        ``atol / rtol`` (``atol`` when ``rtol == 0``), at least the dtype's smallest normal
        number (1 for integer and bool dtypes).
    """
    dt = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
    if _exact_dtype(dt):
        smallest = 1.0
    else:
        try:
            smallest = float(np.finfo(dt).tiny)
        except (TypeError, ValueError):
            smallest = float(np.finfo(np.float32).tiny)
    floor = atol / rtol if rtol > 0 else atol
    return float(max(floor, smallest))


def _failed_check(
    output: str,
    case: str,
    dims: dict[str, int],
    shape: tuple[int, ...],
    dtype: np.dtype,
    atol: float,
    rtol: float,
    reason: str,
) -> OutputCheck:
    n = int(np.prod(shape))
    return OutputCheck(
        output=output, case=case, dims=dims, shape=shape, dtype=str(dtype), atol=atol, rtol=rtol,
        rel_floor=relative_floor(atol, rtol, dtype),
        max_abs=None, max_rel=None, mean_abs=None, p99_abs=None,
        n_bad=n, n_total=n, nan_mismatch=0, ok=False, reason=reason[:_MAX_REASON],
    )  # fmt: skip


def _tolerance(tolerance_for: Callable[[str, str], Tolerance], output: str, dtype: np.dtype) -> tuple[float, float]:
    if _exact_dtype(dtype):
        return 0.0, 0.0
    tol = tolerance_for(output, str(dtype))
    return float(tol.atol), float(tol.rtol)


def _finite(x: float) -> float:
    # |c - r| of two finite float64 values near the limit can overflow; keep reports valid JSON.
    return x if np.isfinite(x) else float(np.finfo(np.float64).max)


def _stats(r: np.ndarray, c: np.ndarray, atol: float, rtol: float, floor: float) -> dict[str, Any]:
    """Error statistics of one output; ``r`` and ``c`` have the same shape."""
    n_total = int(r.size)
    if _exact_dtype(r.dtype) and _exact_dtype(c.dtype):
        # Exact: compare the integers themselves (float64 would round beyond 2**53).
        bad = np.asarray(r != c)
        err = np.abs(r.astype(np.float64) - c.astype(np.float64))
        both = np.ones(r.shape, dtype=bool)
        nonfinite_mismatch = np.zeros(r.shape, dtype=bool)
        ref_mag = np.abs(r.astype(np.float64))
    else:
        wide = np.complex128 if (r.dtype.kind == "c" or c.dtype.kind == "c") else np.float64
        r64 = r.astype(wide)
        c64 = c.astype(wide)
        fr, fc = np.isfinite(r64), np.isfinite(c64)
        both = fr & fc
        if both.all():  # the common case: the same numbers as below, without the masking copies
            with np.errstate(over="ignore"):
                err = np.abs(c64 - r64)
            ref_mag = np.abs(r64)
            nonfinite_mismatch = np.zeros(r.shape, dtype=bool)
            bad = ~(err <= atol + rtol * ref_mag)
        else:
            with np.errstate(invalid="ignore"):
                same_nonfinite = ~fr & ~fc & ((np.isnan(r64) & np.isnan(c64)) | (r64 == c64))
            nonfinite_mismatch = ~both & ~same_nonfinite
            # Zero the non-finite positions before subtracting (inf - inf would warn and give NaN).
            with np.errstate(over="ignore"):
                err = np.abs(np.where(both, c64, 0) - np.where(both, r64, 0))
            ref_mag = np.abs(np.where(both, r64, 0))
            bad = (both & ~(err <= atol + rtol * ref_mag)) | nonfinite_mismatch
    # (a plain view where every value is finite: the same numbers, in the same order, as the mask picks)
    finite_err, finite_ref = (err.reshape(-1), ref_mag.reshape(-1)) if both.all() else (err[both], ref_mag[both])
    max_abs = mean_abs = p99_abs = max_rel = worst_tol = 0.0
    if finite_err.size:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            max_abs = float(finite_err.max())
            mean_abs = float(finite_err.mean())
            p99_abs = float(np.percentile(finite_err, 99))
            max_rel = float((finite_err / np.maximum(finite_ref, floor)).max())
            tol = atol + rtol * finite_ref  # 0 only for a float output held to atol = rtol = 0
            worst_tol = float(np.max(np.where(tol > 0, finite_err / np.where(tol > 0, tol, 1.0), np.where(finite_err > 0, np.inf, 0.0))))
    exact = _exact_dtype(r.dtype) and _exact_dtype(c.dtype)
    return {
        "max_abs": _finite(max_abs),
        "max_rel": _finite(max_rel),
        "mean_abs": _finite(mean_abs),
        "p99_abs": _finite(p99_abs),
        "n_bad": int(bad.sum()),
        "n_total": n_total,
        "nan_mismatch": int(nonfinite_mismatch.sum()),
        "worst_tol": None if exact else _finite(worst_tol),
    }


def compare(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    tolerance_for: Callable[[str, str], Tolerance],
    *,
    case: str = "",
    dims: Mapping[str, int] | None = None,
) -> list[OutputCheck]:
    """Compare every output of ``candidate`` with ``reference`` at one case.

    Args:
        reference: reference outputs keyed by name.
        candidate: candidate outputs keyed by name.
        tolerance_for: ``(output, dtype) -> Tolerance`` (e.g. :func:`tolerance_for` or
            ``spec.tolerance``); not consulted for integer/bool outputs (always exact).
        case: label of this case (``"batch=7"``).
        dims: sizes of the dynamic dims at this case (recorded in the checks).

    Returns:
        One ``OutputCheck`` per reference output (in reference order), then one failing
        check per extra candidate output (sorted).
    """
    dims = dict(dims or {})
    checks: list[OutputCheck] = []
    for name, r_value in reference.items():
        r = np.asarray(r_value)
        dtype = str(r.dtype)
        atol, rtol = _tolerance(tolerance_for, name, r.dtype)
        shape = tuple(int(s) for s in r.shape)
        if name not in candidate:
            checks.append(
                _failed_check(
                    name,
                    case,
                    dims,
                    shape,
                    r.dtype,
                    atol,
                    rtol,
                    f"missing from the candidate (it has: {', '.join(sorted(candidate)) or 'nothing'})",
                )
            )
            continue
        c = np.asarray(candidate[name])
        if c.shape != r.shape:
            checks.append(
                _failed_check(name, case, dims, shape, r.dtype, atol, rtol, f"shape {tuple(c.shape)}, expected {shape}")
            )
            continue
        reason = ""
        if c.dtype != r.dtype and not (np.issubdtype(c.dtype, np.integer) and np.issubdtype(r.dtype, np.integer)):
            reason = f"dtype {c.dtype}, expected {r.dtype}"
        floor = relative_floor(atol, rtol, r.dtype)
        stats = _stats(r, c, atol, rtol, floor)
        ok = not reason and stats["n_bad"] == 0 and stats["nan_mismatch"] == 0
        checks.append(
            OutputCheck(
                output=name,
                case=case,
                dims=dims,
                shape=shape,
                dtype=dtype,
                atol=atol,
                rtol=rtol,
                rel_floor=floor,
                ok=ok,
                reason=reason,
                **stats,
            )
        )
    for name in sorted(set(candidate) - set(reference)):
        c = np.asarray(candidate[name])
        checks.append(
            _failed_check(
                name,
                case,
                dims,
                tuple(int(s) for s in c.shape),
                c.dtype,
                0.0,
                0.0,
                "unexpected output: not produced by the reference",
            )
        )
    return checks


# ---------------------------------------------------------------------------------------
# cases, tolerances, inputs
# ---------------------------------------------------------------------------------------


def _as_tolerance(value: Any, what: str) -> Tolerance:
    from exporter.models.registry import Tolerance

    if isinstance(value, Tolerance):
        tol = value
    elif isinstance(value, Mapping) and set(value) <= {"atol", "rtol"} and value:
        tol = Tolerance(float(value.get("atol", 0.0)), float(value.get("rtol", 0.0)))
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        tol = Tolerance(float(value[0]), float(value[1]))
    else:
        raise UsageError(f"{what}: expected a Tolerance, (atol, rtol) or {{'atol': .., 'rtol': ..}}, got {value!r}")
    _check_nonneg(tol.atol, f"{what} atol")
    _check_nonneg(tol.rtol, f"{what} rtol")
    return tol


def _check_nonneg(x: float, what: str) -> None:
    if not (isinstance(x, (int, float)) and np.isfinite(x) and x >= 0):
        raise UsageError(f"{what} must be a finite number >= 0, got {x!r}")


def tolerance_for(
    spec: ModelSpec | None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    output_tolerances: Mapping[str, Any] | None = None,
    recorded: Mapping[str, Mapping[str, Tolerance]] | None = None,
) -> Callable[[str, str], Tolerance]:
    """The ``(output, dtype) -> Tolerance`` function: the only tolerance lookup there is.

    Precedence: ``output_tolerances[output]`` > ``atol``/``rtol`` arguments (each replaces
    its half of the base) > the base: ``recorded["per_output"][output]``, then
    ``recorded["defaults"][dtype]`` (a bundle's manifest), then ``spec.tolerance(output,
    dtype)`` (per-output, per-dtype, defaults), then ``DEFAULT_TOLERANCES[dtype]``.

    Args:
        spec: the model (``None``: recorded tables and ``DEFAULT_TOLERANCES`` only).
        atol, rtol: global overrides.
        output_tolerances: per-output overrides: ``Tolerance``, ``(atol, rtol)`` or a dict.
        recorded: tolerances recorded with a bundle: ``{"per_output": {output: Tolerance},
            "defaults": {dtype: Tolerance}}`` (either part may be missing).

    Returns:
        The tolerance function.

    Raises:
        UsageError: a negative/non-finite tolerance, or an override for an output the
            model does not have.  The function raises UsageError for an output whose
            dtype has no known tolerance (pass both atol and rtol then).
    """
    from exporter.models.registry import DEFAULT_TOLERANCES, Tolerance

    if atol is not None:
        _check_nonneg(atol, "atol")
    if rtol is not None:
        _check_nonneg(rtol, "rtol")
    per_output = {k: _as_tolerance(v, f"tolerance for output {k!r}") for k, v in (output_tolerances or {}).items()}
    if spec is not None:
        unknown = sorted(set(per_output) - set(spec.outputs))
        if unknown:
            raise UsageError(
                f"tolerance overrides name outputs that model {spec.name!r} does not have: {', '.join(unknown)}; "
                f"its outputs are: {', '.join(spec.outputs)}"
            )
    rec_output = dict((recorded or {}).get("per_output") or {})
    rec_dtype = dict((recorded or {}).get("defaults") or {})

    def base(output: str, dtype: str) -> Tolerance | None:
        if output in rec_output:
            return rec_output[output]
        if dtype in rec_dtype:
            return rec_dtype[dtype]
        if spec is not None:
            return spec.tolerance(output, dtype)
        return DEFAULT_TOLERANCES.get(dtype)

    def tol(output: str, dtype: str) -> Tolerance:
        if output in per_output:
            return per_output[output]
        if atol is not None and rtol is not None:
            return Tolerance(float(atol), float(rtol))
        b = base(output, dtype)
        if b is None:
            raise UsageError(f"no tolerance known for output {output!r} of dtype {dtype!r}; pass atol= and rtol=")
        return Tolerance(b.atol if atol is None else float(atol), b.rtol if rtol is None else float(rtol))

    return tol


def case_label(dims: Mapping[str, int]) -> str:
    """``{"batch": 7, "seq": 16}`` -> ``"batch=7,seq=16"``."""
    return ",".join(f"{k}={v}" for k, v in dims.items())


def sweep_cases(
    spec: ModelSpec,
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    extra_dims: Mapping[str, int | Sequence[int]] | None = None,
) -> list[dict[str, int]]:
    """The dims of every case of a sweep.

    Args:
        spec: the model; dims it uses but the sweep does not set take ``spec.dims``.
        batch_sizes: sizes of the ``batch`` dim (duplicates dropped, order kept).
        extra_dims: other dynamic dims: one size, or several to sweep (cross product with
            the batch sizes, e.g. ``{"seq": (8, 17)}``).

    Returns:
        One ``{dim: size}`` per case, ``batch`` first, then the spec's other dynamic dims.

    Raises:
        UsageError: a size that is not a positive int, no batch sizes, or an unknown dim.
    """
    sizes = list(dict.fromkeys(batch_sizes))
    problems = [f"batch size {b!r} is not a positive int" for b in sizes if not _positive_int(b)]
    if not sizes:
        problems.append("no batch sizes given")
    known = spec.dynamic_dims()
    axes: dict[str, list[int]] = {}
    for dim, value in (extra_dims or {}).items():
        values = [value] if isinstance(value, (int, np.integer)) else list(dict.fromkeys(value))
        if dim == "batch":
            problems.append("set the batch sizes with batch_sizes=, not extra_dims")
        elif dim not in known:
            problems.append(f"unknown dim {dim!r}; model {spec.name!r} has dynamic dims: {', '.join(known)}")
        problems += [f"size {v!r} of dim {dim!r} is not {_size_text(spec, dim)}" for v in values if not _size_ok(spec, dim, v)]
        if not values:
            problems.append(f"no sizes given for dim {dim!r}")
        axes[dim] = [int(v) for v in values if _size_ok(spec, dim, v)]
    if problems:
        raise UsageError(format_problems(f"bad sweep for model {spec.name!r}", problems))
    others = [d for d in known if d != "batch"]
    for d in others:
        axes.setdefault(d, [int(spec.dims[d])] if d in spec.dims else [])
    missing = [d for d in others if not axes[d]]
    if missing:
        raise UsageError(
            f"model {spec.name!r}: no size for dynamic dim(s) {', '.join(missing)}; pass extra_dims={{...}}"
        )
    order = [d for d in others if d in axes]
    cases = []
    for b in sizes:
        for combo in product(*(axes[d] for d in order)):
            cases.append({"batch": int(b), **dict(zip(order, combo))})
    return cases


def _complete_case(spec: ModelSpec, case: Mapping[str, int]) -> dict[str, int]:
    """``case`` with the spec's default size for every dynamic dim it does not set, in spec order."""
    known = spec.dynamic_dims()
    problems = [
        f"unknown dim {d!r}; model {spec.name!r} has dynamic dims: {', '.join(known)}" for d in case if d not in known
    ]
    problems += [f"size {v!r} of dim {d!r} is not {_size_text(spec, d)}" for d, v in case.items() if not _size_ok(spec, d, v)]
    problems += [f"no size for dim {d!r}" for d in known if d not in case and d not in spec.dims]
    if problems:
        raise UsageError(format_problems(f"bad case {dict(case)} for model {spec.name!r}", problems))
    return {d: int(case[d]) if d in case else int(spec.dims[d]) for d in known}


def _positive_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and int(x) >= 1


def _size_ok(spec: ModelSpec, dim: str, x: Any) -> bool:
    """A size of ``dim``: an int >= 1, or >= 0 where the spec allows it (``min_dims``)."""
    least = getattr(spec, "min_dims", {}).get(dim, 1)
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and int(x) >= least


def _size_text(spec: ModelSpec, dim: str) -> str:
    return "an int >= 0" if getattr(spec, "min_dims", {}).get(dim, 1) == 0 else "a positive int"


def load_inputs(path: str | os.PathLike[str], spec: ModelSpec | None = None) -> dict[str, np.ndarray]:
    """Read user inputs from an ``.npz`` (``np.load(allow_pickle=False)``), keyed by input name.

    Args:
        path: the ``.npz`` file (one array per model input).
        spec: when given, the arrays are checked against the model's inputs.

    Returns:
        ``{name: array}``.

    Raises:
        UsageError: unreadable file, object arrays, or arrays that do not fit the model
            (every problem listed, naming the file).
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(
            f"inputs file {str(p)!r} does not exist or is not a file; pass an .npz with one array per model input"
        )
    try:
        with np.load(p, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("it holds a single array, not named arrays")
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(
            f"inputs file {str(p)!r} cannot be read as .npz ({e}); save it with "
            "np.savez(path, **{input_name: array}) (no object arrays)"
        ) from e
    if spec is not None:
        _check_user_inputs(spec, arrays, str(p))
    return arrays


def _check_user_inputs(spec: ModelSpec, arrays: Mapping[str, Any], source: str) -> dict[str, int]:
    from exporter.runtimes.base import IOSpec, check_arrays

    _, problems = check_arrays([IOSpec.from_tensor_spec(t) for t in spec.inputs], arrays)
    if problems:
        raise UsageError(format_problems(f"inputs {source} do not fit model {spec.name!r}", problems))
    dims: dict[str, int] = {}
    for t in spec.inputs:
        for axis, d in enumerate(t.shape):
            if isinstance(d, str):
                dims.setdefault(d, int(np.shape(arrays[t.name])[axis]))
    return dims


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:_MAX_REASON]


def run_and_compare(
    candidate: Runtime,
    inputs: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    tolerance_for: Callable[[str, str], Tolerance],
    *,
    case: str = "",
    dims: Mapping[str, int] | None = None,
) -> list[OutputCheck]:
    """Run ``candidate`` on ``inputs`` and compare with ``expected`` (e.g. stored test data).

    A candidate that cannot take the case (its declared inputs do not fit: e.g. an export
    that fixed the batch dim) or whose runtime fails to run it (a ``RunError``: e.g. a
    Reshape that baked in the export batch size) yields a failing check per expected
    output whose reason carries the problem.  Any other exception propagates: it is a bug,
    not a verdict.

    Returns:
        The checks, as :func:`compare`.
    """
    from exporter.runtimes.base import check_arrays

    _, problems = check_arrays(candidate.inputs, inputs)
    if problems:
        return _not_run(expected, tolerance_for, case, dims, f"{candidate.name} failed to run: the inputs do not fit it: {'; '.join(problems)}")
    try:
        got = candidate.run(inputs)
    except RunError as e:
        return _not_run(expected, tolerance_for, case, dims, f"{candidate.name} failed to run: {_one_line(e)}")
    return compare(expected, got, tolerance_for, case=case, dims=dims)


def _not_run(
    expected: Mapping[str, np.ndarray],
    tolerance_for: Callable[[str, str], Tolerance],
    case: str,
    dims: Mapping[str, int] | None,
    reason: str,
) -> list[OutputCheck]:
    """One failing check per expected output of a case the candidate could not run."""
    checks = []
    for name, r in expected.items():
        r = np.asarray(r)
        atol, rtol = _tolerance(tolerance_for, name, r.dtype)
        checks.append(_failed_check(name, case, dict(dims or {}), tuple(int(x) for x in r.shape), r.dtype, atol, rtol, reason))
    return checks


_FRAMEWORK_OF = {"torch": "torch", "jax": "flax", "flax": "flax"}


Run = tuple[str, dict[str, int], dict[str, np.ndarray]]
"""One case of a check: (label, dims, inputs)."""


def plan_runs(
    spec: ModelSpec,
    *,
    cases: Sequence[Mapping[str, int]] | None = None,
    seed: int = 0,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    inputs_label: str | None = None,
) -> list[Run]:
    """The cases a check runs, with their seeded inputs (see :func:`check` for the arguments).

    ``inputs_label`` names the user inputs' case (default: the file name, or ``"user inputs"``
    for arrays).

    Raises:
        UsageError: bad cases or user inputs; nothing to compare.
    """
    runs: list[Run] = []
    case_dims = sweep_cases(spec) if cases is None else [_complete_case(spec, c) for c in cases]
    for dims in case_dims:
        runs.append((case_label(dims), dims, spec.example_inputs(dims, seed=seed)))
    if inputs is not None:
        if isinstance(inputs, (str, os.PathLike)):
            arrays = load_inputs(inputs)
            label = inputs_label or Path(inputs).name
        else:
            arrays = {k: np.asarray(v) for k, v in inputs.items()}
            label = inputs_label or "user inputs"
        runs.append((label, _check_user_inputs(spec, arrays, label), arrays))
    if not runs:
        raise UsageError(f"nothing to compare for model {spec.name!r}: no cases and no inputs given")
    return runs


def check_runs(
    spec: ModelSpec,
    runs: Sequence[Run],
    expected: Sequence[Mapping[str, np.ndarray]],
    candidate: Runtime,
    *,
    tolerance: Callable[[str, str], Tolerance],
    reference: str,
    seed: int = 0,
    framework: str | None = None,
) -> ParityReport:
    """Compare ``candidate`` with reference outputs computed earlier (one per run).

    Lets a caller run the framework over every case, free it, and only then load the
    candidate, so a large model's weights are not held twice.

    Args:
        spec, seed, framework: as :func:`check`.
        runs: from :func:`plan_runs`.
        expected: the reference's outputs for each run, in order.
        candidate: the runtime under test.
        tolerance: from :func:`tolerance_for`.
        reference: the reference runtime's name (recorded in the report).

    Returns:
        The report.
    """
    assert len(runs) == len(expected), (len(runs), len(expected))
    checks: list[OutputCheck] = []
    for (label, dims, feed), want in zip(runs, expected):
        checks += run_and_compare(candidate, feed, dict(want), tolerance, case=label, dims=dims)
    return ParityReport(
        model=spec.name,
        framework=framework or _FRAMEWORK_OF.get(reference, reference),
        reference=reference,
        candidate=candidate.name,
        checks=tuple(checks),
        seed=seed,
    )


def check(
    spec: ModelSpec,
    reference: Runtime,
    candidate: Runtime,
    *,
    cases: Sequence[Mapping[str, int]] | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    output_tolerances: Mapping[str, Any] | None = None,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    framework: str | None = None,
) -> ParityReport:
    """Run ``reference`` and ``candidate`` on the same seeded inputs at every case and compare.

    The reference failing (any exception) propagates: only the candidate's ``RunError``
    becomes a failing check.

    Args:
        spec: the model (inputs, outputs, tolerances).
        reference: the runtime taken as truth (usually the framework: ``TorchRuntime``).
        candidate: the runtime under test (usually ``OnnxRuntime``).
        cases: dims per case; ``None`` = ``sweep_cases(spec)`` (batch 1, 2, 7, 64).
        seed: seed of the example inputs (``spec.example_inputs(dims, seed)``).
        atol, rtol, output_tolerances: tolerance overrides (see :func:`tolerance_for`).
        inputs: user inputs (an ``.npz`` path or a dict of arrays), run as one more case.
        framework: recorded in the report; default derived from the reference's name.

    Returns:
        The report; ``bool(report)`` is the verdict (call ``raise_for_failure()`` to raise).

    Raises:
        UsageError: bad tolerances, cases or user inputs; nothing to compare.
    """
    tol = tolerance_for(spec, atol=atol, rtol=rtol, output_tolerances=output_tolerances)
    runs = plan_runs(spec, cases=cases, seed=seed, inputs=inputs)
    expected = [reference.run(feed) for _label, _dims, feed in runs]
    return check_runs(spec, runs, expected, candidate, tolerance=tol, reference=reference.name, seed=seed, framework=framework)
