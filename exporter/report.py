"""The report people look at: one self-contained HTML file over every bundle of an export.

    report(out_dir, html="report.html")   -> Report (and the file)

One row per model x framework x variant (verdict, worst error as a fraction of the
tolerance, cases, time), then per bundle its provenance (the manifest), its checks, and per
output one picture per swept case: the distribution of every element's error as a
fraction of that element's own tolerance, ``|c - r| / (atol + rtol * |r|)``, on a log
axis against the tolerance line at 1.  An element passes exactly when its bar lies left of
the line, so a picture reads like the verdict, for near-zero values too.

**Where the per-element errors come from.**  A bundle stores the framework's outputs
(``test_data_set_<k>/output_<i>.pb``) but only summary statistics of the candidate's
(``parity.json``), so the report reruns ``model.onnx`` in onnxruntime on the stored
inputs with the session settings the manifest records.  That keeps the bundle format as it
is (no histogram to keep in sync with the verdict), works for every bundle ever written,
and needs only onnx + onnxruntime; the cost is one onnxruntime pass over the test data
(about a second for the registry's bundles on 2 cores).  Where the rerun's verdict on
a check differs from ``parity.json``'s, the report says so rather than hiding it.

The file has no external references (inline CSS, inline SVG, a few lines of inline
JavaScript for filtering) and is written atomically (``exporter.atomic.write_text``).

**Hooks.**  Per-bundle sections are renderers in :data:`SECTIONS`, called with the
bundle's :class:`BundleRow`; the built-in ones show a variant's task metrics
(``manifest["metrics"]``, exporter.metrics) and a decoder's generation parity
(``manifest["generation"]``, exporter.generation) when a bundle has them.  Register more with
:func:`register_section`.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import BundleError, ExporterError, UsageError

__all__ = [
    "DEFAULT_VARIANT",
    "BIN_EDGES",
    "CaseErrors",
    "BundleRow",
    "Report",
    "SECTIONS",
    "register_section",
    "collect",
    "SummaryRow",
    "worst_of",
    "export_summary",
    "summary_table",
    "render_html",
    "report",
]

DEFAULT_VARIANT = "fp32"
#: Histogram edges in fractions of the tolerance: [0, 1e-6], half decades up to 1e2, (1e2, inf].
BIN_EDGES: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-12, 5))


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class CaseErrors:
    """Per-element errors of one output at one case, as fractions of the tolerance.

    Attributes:
        output, case: which check.
        dtype: the output's dtype.
        n: elements.
        n_bad: elements above the tolerance (NaN/Inf mismatches included).
        nonfinite: NaN/Inf mismatches.
        worst: the largest fraction (``inf`` for a NaN/Inf mismatch or an exact mismatch).
        counts: elements per bin of :data:`BIN_EDGES` (``len(BIN_EDGES) + 1`` bins, bin k
            holding fractions in ``(BIN_EDGES[k-1], BIN_EDGES[k]]``: the first holds fractions
            up to 1e-6, exact matches included; the last those above 100 and NaN/Inf mismatches).
        exact: an integer/bool output (compared exactly; no histogram).
    """

    output: str
    case: str
    dtype: str
    n: int
    n_bad: int
    nonfinite: int
    worst: float
    counts: tuple[int, ...]
    exact: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output, "case": self.case, "dtype": self.dtype, "n": self.n, "n_bad": self.n_bad,
            "nonfinite": self.nonfinite, "worst": None if math.isinf(self.worst) else self.worst,
            "counts": list(self.counts), "exact": self.exact,
        }  # fmt: skip


@dataclass(frozen=True)
class BundleRow:
    """One bundle (model x framework x variant) of the report."""

    model: str
    framework: str
    variant: str
    path: Path
    ok: bool
    worst: float | None
    cases: int
    checks: int
    failing: int
    seconds: float | None
    manifest: dict[str, Any]
    parity: dict[str, Any]
    errors: tuple[CaseErrors, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def anchor(self) -> str:
        return "b-" + "-".join("".join(ch if ch.isalnum() else "_" for ch in s) for s in (self.model, self.framework, self.variant))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "framework": self.framework, "variant": self.variant, "path": str(self.path),
            "ok": self.ok, "worst": None if self.worst is None or math.isinf(self.worst) else self.worst,
            "cases": self.cases, "checks": self.checks, "failing": self.failing, "seconds": self.seconds,
            "notes": list(self.notes), "errors": [e.to_dict() for e in self.errors],
        }  # fmt: skip


@dataclass(frozen=True)
class Report:
    """Every bundle under ``out``; ``html`` is the file written (or None)."""

    out: Path
    rows: tuple[BundleRow, ...]
    html: Path | None = None
    created: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def __bool__(self) -> bool:
        return self.ok

    def table(self) -> str:
        """The terminal summary: one line per bundle, then the final verdict."""
        n_ok = sum(1 for r in self.rows if r.ok)
        verdict = "PASS" if self.ok else "FAIL"
        tail = f"{verdict}: {len(self.rows)} bundles under {self.out}: {n_ok} passed, {len(self.rows) - n_ok} failed"
        return summary_table(self.rows) + "\n" + tail + (f"\nreport: {self.html}" if self.html else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "exporter-report", "out": str(self.out), "html": None if self.html is None else str(self.html),
            "ok": self.ok, "created": self.created, "rows": [r.to_dict() for r in self.rows],
        }  # fmt: skip


@dataclass(frozen=True)
class SummaryRow:
    """One line of the terminal summary."""

    model: str
    framework: str
    variant: str
    ok: bool
    worst: float | None
    cases: int
    seconds: float | None
    up_to_date: bool = False


def worst_of(checks: Sequence[Any]) -> float | None:
    """The worst error as a fraction of tolerance over ``checks`` (OutputCheck objects or their
    dicts): their ``worst_tol``; a failing check without one (not run, shape or integer
    mismatch) counts as infinite.  None when there is nothing to measure."""
    values = []
    for c in checks:
        get = c.get if isinstance(c, Mapping) else lambda k, c=c: getattr(c, k, None)
        w = get("worst_tol")
        if w is not None:
            values.append(float(w))
        elif not get("ok"):
            values.append(math.inf)
    return max(values) if values else None


def export_summary(export_report: Any, *, max_failures: int = 20) -> str:
    """What ``exporter export`` prints: one line per bundle, the failures of failing bundles,
    export errors, and the final verdict (``-v`` prints every per-case table instead).

    Args:
        export_report: an ``exporter.api.ExportReport``.
        max_failures: failure lines shown per bundle (the rest are counted; ``-v`` and the
            bundle's parity.json have all of them).
    """
    rows = [
        SummaryRow(
            model=r.model, framework=r.framework, variant=str(getattr(r, "variant", None) or DEFAULT_VARIANT), ok=r.ok,
            worst=worst_of(r.parity.checks), cases=len(r.parity.cases), seconds=r.seconds.get("total"),
            up_to_date=bool(getattr(r, "up_to_date", False)),
        )
        for r in export_report.results
    ]  # fmt: skip
    blocks = [summary_table(rows)] if rows else []
    for r in export_report.results:
        if r.ok:
            continue
        lines = r.parity.failures()
        shown = [f"  - {line}" for line in lines[:max_failures]]
        if len(lines) > max_failures:
            shown.append(f"  ... and {len(lines) - max_failures} more (-v, or {r.path}/parity.json)")
        blocks.append("\n".join([r.headline(), *shown, *(f"  hint: {h}" for h in r.parity.hints)]))
    blocks += [f"{e.model} ({e.framework}): ERROR {e.error}: {e.message}" for e in export_report.errors]
    blocks.append(export_report.summary())
    return "\n".join(blocks)


def summary_table(rows: Sequence[Any]) -> str:
    """One aligned line per bundle: model, framework, variant, verdict, worst error / tolerance, cases, time.

    ``rows`` are :class:`BundleRow` (or anything with those attributes: ``model``,
    ``framework``, ``variant``, ``ok``, ``worst``, ``cases``, ``seconds``).
    """
    table = [("model", "framework", "variant", "verdict", "worst/tol", "cases", "time")]
    for r in rows:
        table.append((
            r.model, r.framework, r.variant, ("PASS" if r.ok else "FAIL") + (", up to date" if getattr(r, "up_to_date", False) else ""),
            "-" if r.worst is None else "inf" if math.isinf(r.worst) else f"{r.worst:.2g}x", str(r.cases),
            "-" if r.seconds is None else f"{r.seconds:.1f} s",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {4, 5, 6}
    return "\n".join(
        "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip() for row in table
    )


# --------------------------------------------------------------------------- errors per element
def _fractions(ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> tuple[np.ndarray, int]:
    """``|c - r| / (atol + rtol |r|)`` for elements finite in both, and the NaN/Inf mismatches."""
    r = ref.astype(np.float64)
    c = cand.astype(np.float64)
    fr, fc = np.isfinite(r), np.isfinite(c)
    both = fr & fc
    with np.errstate(invalid="ignore"):
        same_nonfinite = ~fr & ~fc & ((np.isnan(r) & np.isnan(c)) | (r == c))
    nonfinite = int((~both & ~same_nonfinite).sum())
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        err = np.abs(c[both] - r[both])
        tol = atol + rtol * np.abs(r[both])
        frac = np.where(tol > 0, err / np.where(tol > 0, tol, 1.0), np.where(err > 0, np.inf, 0.0))
    return frac, nonfinite


def _case_errors(output: str, case: str, ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> CaseErrors:
    n = int(ref.size)
    exact = bool(np.issubdtype(ref.dtype, np.integer) or np.issubdtype(ref.dtype, np.bool_))
    if exact or cand.shape != ref.shape:
        bad = n if cand.shape != ref.shape else int(np.sum(ref != cand))
        return CaseErrors(output, case, str(ref.dtype), n, bad, 0, math.inf if bad else 0.0, (), exact=exact)
    frac, nonfinite = _fractions(ref, cand, atol, rtol)
    finite = frac[np.isfinite(frac)]
    # bins (E[k-1], E[k]]: an element exactly at its tolerance passes, and lands left of the line
    counts = np.bincount(np.searchsorted(BIN_EDGES, finite, side="left"), minlength=len(BIN_EDGES) + 1)
    counts[-1] += int(np.sum(~np.isfinite(frac))) + nonfinite
    counts[0] += n - int(frac.size) - nonfinite  # NaN where NaN, Inf where Inf: equal
    worst = math.inf if nonfinite or not np.all(np.isfinite(frac)) else float(frac.max()) if frac.size else 0.0
    return CaseErrors(
        output, case, str(ref.dtype), n, int(np.sum(frac > 1.0)) + nonfinite, nonfinite, worst, tuple(int(x) for x in counts)
    )


def _tolerances(root: Path, manifest: Mapping[str, Any]) -> Callable[[str, str], tuple[float, float]]:
    """``(output, dtype) -> (atol, rtol)`` from the bundle's recorded tolerances (the verdict's own lookup)."""
    from exporter import bundle, parity

    tol = parity.tolerance_for(None, recorded=bundle.recorded_tolerances(manifest, root))

    def get(output: str, dtype: str) -> tuple[float, float]:
        try:
            t = tol(output, dtype)
        except UsageError:  # a dtype with no known tolerance (uint8, ...): plotted as an exact comparison
            return 0.0, 0.0
        return float(t.atol), float(t.rtol)

    return get


def _rerun(root: Path, manifest: Mapping[str, Any]) -> tuple[list[CaseErrors], list[str]]:
    """Rerun the bundle's model.onnx in onnxruntime (the manifest's settings) on every data set."""
    from exporter.runtimes.base import load_runtime
    from exporter.testdata import read_test_data

    tolerance = _tolerances(root, manifest)

    settings = manifest.get("onnxruntime") or {}
    kwargs: dict[str, Any] = {}
    if settings.get("intra_op_num_threads"):
        kwargs["intra_op_threads"] = int(settings["intra_op_num_threads"])
    if settings.get("graph_optimization_level"):
        kwargs["graph_optimization_level"] = str(settings["graph_optimization_level"])
    if "prepacking" in settings:
        kwargs["prepacking"] = bool(settings["prepacking"])
    onnx_file = root / str((manifest.get("onnx") or {}).get("file", "model.onnx"))
    sets = manifest.get("test_data_sets") or [{"dir": p.name, "case": p.name} for p in sorted(root.glob("test_data_set_*"))]
    out: list[CaseErrors] = []
    notes: list[str] = []
    try:
        rt = load_runtime("onnxruntime", str(onnx_file), **kwargs)
    except ExporterError as e:
        return [], [f"no per-element errors: onnxruntime could not load {onnx_file.name}: {e}"]
    try:
        for s in sets:
            case = str(s.get("case") or s["dir"])
            try:
                inputs, expected = read_test_data(root / s["dir"])
                got = rt.run(inputs)
            except ExporterError as e:
                notes.append(f"{case}: no per-element errors: {e}")
                continue
            for name, ref in expected.items():
                if name in got:
                    atol, rtol = tolerance(name, str(ref.dtype))
                    out.append(_case_errors(name, case, np.asarray(ref), np.asarray(got[name]), atol, rtol))
    finally:
        rt.close()
    return out, notes


# --------------------------------------------------------------------------- collect
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} cannot be read as JSON ({e}); re-export the bundle") from e
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object; re-export the bundle")
    return data


def _row(root: Path, *, rerun: bool) -> BundleRow:
    from exporter.bundle import read_manifest

    manifest = read_manifest(root)
    parity_file = root / str((manifest.get("parity") or {}).get("report", "parity.json"))
    parity = _read_json(parity_file) if parity_file.is_file() else {"checks": [], "ok": False, "cases": []}
    checks = list(parity.get("checks", []))
    errors, notes = _rerun(root, manifest) if rerun else ([], [])
    if not parity_file.is_file():
        notes.insert(0, f"{parity_file.name} is missing: the export's verdict is unknown")
    by_key = {(e.output, e.case): e for e in errors}
    for c in checks:  # the rerun must reproduce the export's numbers
        e = by_key.get((c["output"], c["case"]))
        if e is not None and c["case"] != "integrity" and not c.get("reason") and c["ok"] != (e.n_bad == 0):
            notes.append(
                f"{c['output']} @ {c['case']}: the rerun here {'fails' if e.n_bad else 'passes'} but the export's sweep "
                f"{'passed' if c['ok'] else 'failed'} (another machine or onnxruntime build computes differently)"
            )
    worst: float | None
    if errors:
        worst = max(e.worst for e in errors)
    elif any("worst_tol" in c for c in checks):  # recorded by the sweep itself
        worst = worst_of(checks)
    else:  # an older parity.json: max_rel / rtol bounds the fraction (within 2x, see exporter.parity)
        fr = [float(c["max_rel"]) / float(c["rtol"]) for c in checks if c.get("max_rel") is not None and float(c.get("rtol") or 0) > 0]
        worst = max(fr) if fr else None
    seconds = (manifest.get("seconds") or {}).get("total")
    verdict = manifest.get("verdict")  # a variant bundle: its task metrics may decide (exporter.variants)
    ok = verdict == "pass" if verdict in ("pass", "fail") else bool(parity.get("ok")) and bool(checks)
    return BundleRow(
        model=str(manifest.get("model", root.parent.name)),
        framework=str(manifest.get("framework", root.name)),
        variant=str(manifest.get("variant") or DEFAULT_VARIANT),
        path=root,
        ok=ok,
        worst=worst,
        cases=len(parity.get("cases") or {c["case"] for c in checks}),
        checks=len(checks),
        failing=sum(1 for c in checks if not c.get("ok")),
        seconds=None if seconds is None else float(seconds),
        manifest=manifest,
        parity=parity,
        errors=tuple(errors),
        notes=tuple(notes),
    )


def collect(out_dir: str | os.PathLike[str], *, rerun: bool = True) -> Report:
    """Read every bundle under ``out_dir`` (and rerun it for per-element errors).

    Args:
        out_dir: an export's OUT directory (or one bundle).
        rerun: compute per-element errors by rerunning each model in onnxruntime.

    Returns:
        The :class:`Report` (no file written).

    Raises:
        BundleError: no bundle under ``out_dir``, or an unreadable manifest / parity.json.
    """
    from exporter.bundle import find_bundles

    t0 = time.perf_counter()
    rows = [_row(b, rerun=rerun) for b in find_bundles(out_dir)]
    rows.sort(key=lambda r: (r.model, r.framework, r.variant))
    created = datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return Report(out=Path(out_dir), rows=tuple(rows), created=created, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- hooks
Section = Callable[[BundleRow], "str | None"]


def _task_metrics(row: BundleRow) -> str | None:
    """A variant bundle's task metrics (``manifest["metrics"]["report"]``, exporter.metrics.MetricReport)."""
    record = row.manifest.get("metrics") or {}
    metrics = (record.get("report") or {}).get("metrics") if isinstance(record, Mapping) else None
    if not metrics:
        return None
    head = "".join(f"<th>{h}</th>" for h in ("output", "kind", "metric", "value", "threshold", "verdict"))
    body = "".join(
        f"<tr class='{'ok' if m.get('ok') else 'bad'}'><td>{_e(m.get('output'))}</td><td>{_e(m.get('kind'))}</td>"
        f"<td>{_e(m.get('metric'))}</td><td>{_fmt(m.get('value'))}</td><td>{_fmt(m.get('threshold'))}</td>"
        f"<td>{_badge(bool(m.get('ok')))}</td></tr>"
        for m in metrics
    )
    return f"<table class='checks'><tr>{head}</tr>{body}</table>"


def _generation_steps(row: BundleRow) -> str | None:
    """A decoder bundle's generation parity (``manifest["generation"]``, exporter.generation)."""
    gen = row.manifest.get("generation")
    if not isinstance(gen, Mapping) or not gen.get("sets"):
        return None
    summary = gen.get("summary") or {}
    parts = [
        f"<p class='meta'>{_badge(bool(summary.get('ok')))} {summary.get('steps_compared', '?')} steps compared, "
        f"{summary.get('tokens_generated', '?')} tokens generated against {_e(gen.get('reference', '?'))}, "
        f"max_abs {_fmt(summary.get('max_abs'))}, ambiguous steps: {len(summary.get('ambiguous_steps') or [])}</p>"
    ]
    parts += [f"<p class='failure'>{_e(f)}</p>" for f in summary.get("failures") or []]
    keys = ("case", "batch", "new_tokens", "prompt_lengths", "logits")
    head = "".join(f"<th>{k}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(s.get(k))}</td>" for k in keys) + "</tr>" for s in gen["sets"])
    parts.append(f"<table class='checks'><tr>{head}</tr>{body}</table>")
    return "".join(parts)


#: Section title -> renderer: called per bundle; returns an HTML fragment or None (no section).
SECTIONS: dict[str, Section] = {"Task metrics": _task_metrics, "Generation steps": _generation_steps}


def register_section(title: str, render: Section) -> None:
    """Add (or replace) a per-bundle section of the HTML report.

    Args:
        title: the section's heading.
        render: ``BundleRow -> HTML fragment`` (escape what you insert), or None to skip
            the section for that bundle.
    """
    if not callable(render):
        raise UsageError(f"report section {title!r}: render must be callable, got {type(render).__name__}")
    SECTIONS[title] = render


# --------------------------------------------------------------------------- HTML
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.3g}"
    if isinstance(x, (dict, list)):
        return f"<code>{_e(json.dumps(x, sort_keys=True))}</code>"
    return _e(x)


def _frac(x: float | None) -> str:
    if x is None:
        return "–"
    if math.isinf(x):
        return "∞"
    return f"{x:.2g}×"


def _badge(ok: bool) -> str:
    return f"<span class='badge {'pass' if ok else 'fail'}'>{'PASS' if ok else 'FAIL'}</span>"


_W, _H, _L, _R, _T, _B = 300, 132, 30, 8, 22, 26  # svg size and plot margins


def _histogram(e: CaseErrors) -> str:
    """One case's picture: bars of elements per half decade of the fraction of tolerance."""
    title = f"{e.output} @ {e.case}: worst {_frac(e.worst)} of tolerance, {e.n_bad}/{e.n} elements out"
    cls = "ok" if e.n_bad == 0 else "bad"
    head = (
        f"<svg class='hist {cls}' viewBox='0 0 {_W} {_H}' width='{_W}' height='{_H}' role='img' "
        f"data-case='{_e(e.case)}' data-output='{_e(e.output)}'><title>{_e(title)}</title>"
        f"<text x='{_L}' y='14' class='cap'>{_e(e.case)} · worst {_e(_frac(e.worst))}</text>"
    )
    if e.exact or not e.counts:
        verdict = "equal" if e.n_bad == 0 else f"{e.n_bad}/{e.n} differ"
        return head + (
            f"<rect x='{_L}' y='{_T}' width='{_W - _L - _R}' height='{_H - _T - _B}' class='frame'/>"
            f"<text x='{_W / 2}' y='{_H / 2 + 4}' text-anchor='middle' class='big'>{_e(e.dtype)}: exact, {_e(verdict)}</text></svg>"
        )
    nb = len(e.counts)
    pw, ph = _W - _L - _R, _H - _T - _B
    bw = pw / nb
    top = math.log1p(max(e.counts)) or 1.0
    parts = [f"<rect x='{_L}' y='{_T}' width='{pw}' height='{ph}' class='frame'/>"]
    # bin k holds fractions in (BIN_EDGES[k-1], BIN_EDGES[k]]: edge j is drawn at x = (j + 1) bins
    tol_edge = BIN_EDGES.index(1.0) + 1
    for k, count in enumerate(e.counts):
        if not count:
            continue
        h = ph * math.log1p(count) / top
        bar = "over" if k >= tol_edge else "under"
        parts.append(
            f"<rect x='{_L + k * bw + 0.5:.1f}' y='{_T + ph - h:.1f}' width='{bw - 1:.1f}' height='{h:.1f}' class='{bar}'>"
            f"<title>{count} elements</title></rect>"
        )
    x_tol = _L + tol_edge * bw
    parts.append(f"<line x1='{x_tol:.1f}' y1='{_T - 4}' x2='{x_tol:.1f}' y2='{_T + ph}' class='tol'/>")
    parts.append(f"<text x='{x_tol + 3:.1f}' y='{_T + 8}' class='tollabel'>tol</text>")
    for edge_index, label in ((0, "1e-6"), (4, "1e-4"), (8, "0.01"), (12, "1"), (16, "100")):
        x = _L + (edge_index + 1) * bw
        parts.append(f"<line x1='{x:.1f}' y1='{_T + ph}' x2='{x:.1f}' y2='{_T + ph + 3}' class='tick'/>")
        parts.append(f"<text x='{x:.1f}' y='{_T + ph + 13}' text-anchor='middle' class='ticklabel'>{label}</text>")
    parts.append(f"<text x='{_L + pw / 2}' y='{_H - 2}' text-anchor='middle' class='axis'>|c − r| / (atol + rtol·|r|)</text>")
    return head + "".join(parts) + "</svg>"


_PROVENANCE = (
    ("summary", "summary"), ("exporter", "exporter"), ("fallback reason", "fallback_reason"), ("opset", "opset"),
    ("ONNX file", "onnx"), ("weights bytes", "weights_bytes"), ("checkpoint", "checkpoint"), ("seed", "seed"),
    ("batch sizes", "batch_sizes"), ("inputs", "inputs"), ("outputs", "outputs"), ("tolerances", "tolerances"),
    ("onnxruntime settings", "onnxruntime"), ("versions", "versions"), ("export warnings", "export_warnings"),
    ("seconds", "seconds"), ("created", "created"),
)  # fmt: skip


def _provenance(m: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(label)}</th><td>{_fmt(m.get(key))}</td></tr>" for label, key in _PROVENANCE if key in m)
    return f"<table class='kv'>{rows}</table>"


def _checks_table(row: BundleRow) -> str:
    by_key = {(e.output, e.case): e for e in row.errors}
    head = "".join(f"<th>{h}</th>" for h in ("output", "case", "shape", "dtype", "max_abs", "max_rel", "p99_abs", "bad", "worst / tol", "atol", "rtol", "verdict"))
    body = []
    for c in row.parity.get("checks", []):
        e = by_key.get((c["output"], c["case"]))
        shape = "–" if c.get("shape") is None else "×".join(map(str, c["shape"])) or "scalar"
        verdict = _badge(bool(c["ok"])) + (f" <span class='reason'>{_e(c['reason'])}</span>" if c.get("reason") else "")
        body.append(
            f"<tr class='{'ok' if c['ok'] else 'bad'}'><td>{_e(c['output'])}</td><td>{_e(c['case'])}</td><td>{_e(shape)}</td>"
            f"<td>{_e(c['dtype'])}</td><td>{_fmt(c.get('max_abs'))}</td><td>{_fmt(c.get('max_rel'))}</td>"
            f"<td>{_fmt(c.get('p99_abs'))}</td><td>{c['n_bad']}/{c['n_total']}</td><td>{_frac(e.worst if e else None)}</td>"
            f"<td>{_fmt(c['atol'])}</td><td>{_fmt(c['rtol'])}</td><td>{verdict}</td></tr>"
        )
    return f"<table class='checks'><tr>{head}</tr>{''.join(body)}</table>"


def _bundle_section(row: BundleRow) -> str:
    parts = [
        f"<section class='bundle {'ok' if row.ok else 'bad'}' id='{row.anchor}'>",
        f"<h2>{_badge(row.ok)} {_e(row.model)} · {_e(row.framework)} · {_e(row.variant)}</h2>",
        f"<p class='path'>{_e(row.path)} — {_e(row.parity.get('candidate', '?'))} vs {_e(row.parity.get('reference', '?'))}, "
        f"{row.checks} checks over {row.cases} cases, worst {_e(_frac(row.worst))} of tolerance</p>",
    ]
    for n in row.notes:
        parts.append(f"<p class='note'>{_e(n)}</p>")
    for f in row.parity.get("failures", []):
        parts.append(f"<p class='failure'>{_e(f)}</p>")
    outputs = list(dict.fromkeys(e.output for e in row.errors))
    for o in outputs:
        pics = "".join(_histogram(e) for e in row.errors if e.output == o)
        parts.append(f"<h3>{_e(o)}: error per element, per case</h3><div class='plots'>{pics}</div>")
    parts.append("<details><summary>checks</summary>" + _checks_table(row) + "</details>")
    parts.append("<details><summary>provenance (manifest.json)</summary>" + _provenance(row.manifest) + "</details>")
    for title, render in SECTIONS.items():
        fragment = render(row)
        if fragment:
            parts.append(f"<h3>{_e(title)}</h3>{fragment}")
    parts.append("</section>")
    return "".join(parts)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 4px} h3{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;margin:6px 0} td,th{padding:3px 8px;border-bottom:1px solid #e3e6ec;text-align:left;vertical-align:top}
table.summary th{background:#f3f5f8} table.summary td.num,table.checks td:nth-child(n+5){text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:0 7px;border-radius:9px;font-weight:600;font-size:12px;color:#fff}
.badge.pass{background:#2f8f5b} .badge.fail{background:#c0392b}
.path,.meta{color:#5a6273;font-size:12px;margin:2px 0} .note{color:#8a5a00;font-size:12px} .failure{color:#c0392b;font-size:12px;font-family:monospace}
.plots{display:flex;flex-wrap:wrap;gap:6px}
svg.hist{background:#fafbfc;border:1px solid #e3e6ec;border-radius:4px} svg.hist.bad{border-color:#c0392b}
svg .frame{fill:none;stroke:#d5d9e0} svg .under{fill:#3f9d6b} svg .over{fill:#c0392b}
svg .tol{stroke:#c0392b;stroke-width:1.5;stroke-dasharray:4 3} svg .tick{stroke:#8a90a0}
svg text{font:10px system-ui,sans-serif;fill:#5a6273} svg .cap{font-weight:600;fill:#1d2330} svg .tollabel{fill:#c0392b}
svg .big{font-size:12px;fill:#1d2330}
code{font-size:11px;white-space:pre-wrap;word-break:break-all} .reason{color:#c0392b;font-size:12px}
.controls{margin:10px 0} body.only-failures .ok{display:none}
"""

_JS = """
(function () {
  var box = document.getElementById('only-failures');
  box.addEventListener('change', function () { document.body.classList.toggle('only-failures', box.checked); });
  document.querySelectorAll('table.summary tr[data-target]').forEach(function (tr) {
    tr.addEventListener('click', function () { document.getElementById(tr.dataset.target).scrollIntoView(); });
  });
})();
"""


def render_html(rep: Report) -> str:
    """The report as one self-contained HTML document."""
    n_ok = sum(1 for r in rep.rows if r.ok)
    head = "".join(f"<th>{h}</th>" for h in ("model", "framework", "variant", "verdict", "worst error / tolerance", "cases", "checks", "failing", "time"))
    rows = []
    for r in rep.rows:
        t = "–" if r.seconds is None else f"{r.seconds:.1f} s"
        rows.append(
            f"<tr class='{'ok' if r.ok else 'bad'}' data-target='{r.anchor}'><td><a href='#{r.anchor}'>{_e(r.model)}</a></td>"
            f"<td>{_e(r.framework)}</td><td>{_e(r.variant)}</td><td>{_badge(r.ok)}</td><td class='num'>{_e(_frac(r.worst))}</td>"
            f"<td class='num'>{r.cases}</td><td class='num'>{r.checks}</td><td class='num'>{r.failing}</td><td class='num'>{t}</td></tr>"
        )
    verdict = "PASS" if rep.ok else "FAIL"
    body = (
        f"<h1>exporter report: {_badge(rep.ok)}</h1>"
        f"<p class='meta'>{_e(rep.out)} · {len(rep.rows)} bundles, {n_ok} passed, {len(rep.rows) - n_ok} failed · "
        f"generated {_e(rep.created)}</p>"
        "<p class='meta'>worst error / tolerance: the largest |c − r| / (atol + rtol·|r|) over every element of every "
        "output and case (an element passes at ≤ 1×); per-element errors recomputed in onnxruntime from the bundle's "
        "test data.</p>"
        "<div class='controls'><label><input type='checkbox' id='only-failures'> show failures only</label></div>"
        f"<table class='summary'><tr>{head}</tr>{''.join(rows)}</table>"
        + "".join(_bundle_section(r) for r in rep.rows)
    )
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>exporter report: {verdict} ({n_ok}/{len(rep.rows)})</title>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<link rel='icon' href='data:,'>"
        f"<style>{_CSS}</style></head><body>{body}<script>{_JS}</script></body></html>\n"
    )


def report(
    out_dir: str | os.PathLike[str],
    html: str | os.PathLike[str] | None = None,
    *,
    rerun: bool = True,
) -> Report:
    """Collect every bundle under ``out_dir`` and write the HTML report.

    Args:
        out_dir: an export's OUT directory (or one bundle).
        html: where to write the HTML file (atomically); None writes nothing.
        rerun: recompute per-element errors in onnxruntime (the pictures need it).

    Returns:
        The :class:`Report`; ``bool(report)`` is True when every bundle passed.

    Raises:
        BundleError: no bundle under ``out_dir``; unreadable bundle files.
    """
    from exporter import atomic

    rep = collect(out_dir, rerun=rerun)
    if html is None:
        return rep
    target = Path(html)
    rep = Report(out=rep.out, rows=rep.rows, html=target, created=rep.created, seconds=rep.seconds)
    atomic.write_text(target, render_html(rep))
    return rep

