"""Variant bundles: ``OUT/<model>/<framework>-<variant>/``, the same layout as the float32 bundle.

:func:`build_variants` runs after the float32 bundle of one (model, framework) is
published, while the framework's outputs of the sweep are still in memory: each variant
is made from the published ``model.onnx`` and judged against those outputs (never
against the float32 ONNX), then written atomically beside it:

    model.onnx          the variant
    manifest.json       the float32 manifest's provenance, plus ``variant``, ``verdict``,
                        ``variant_info`` (tool, version, options, details), ``metrics``
                        (kinds, thresholds, report), ``elementwise_decides``, the variant's
                        per-output tolerances and ``source_bundle``
    parity.json         the elementwise report plus ``variant``, ``verdict``, ``metrics``
    parity.junit.xml    the elementwise report as JUnit
    test_data_set_<k>/  the same inputs and framework outputs as the float32 bundle's

A variant the model cannot take is reported as skipped (no bundle).  A variant whose
transform failed, or that onnxruntime cannot even open (a crash in a child process), is
reported as failing and not published: a bundle nobody can load is not a bundle.

:func:`variant_checks` is what ``exporter.bundle.verify`` calls on such a bundle.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter import atomic, provenance, testdata
from exporter.errors import BundleError, RunError

if TYPE_CHECKING:  # pragma: no cover
    from exporter.parity import OutputCheck
    from exporter.plan import ExportPlan
    from exporter.runtimes.base import Runtime
    from exporter.variants import VariantResult

__all__ = ["bundle_name", "build_variants", "variant_checks"]

_MANIFEST = "manifest.json"
_ONNX = "model.onnx"
_PARITY_JSON = "parity.json"
_PARITY_JUNIT = "parity.junit.xml"
_TEST_DATA_PREFIX = "test_data_set_"


def bundle_name(framework: str, variant: str) -> str:
    """``"torch-int8"``: the variant bundle's directory name beside ``<framework>``."""
    return f"{framework}-{variant}"


class _NotPublished(Exception):
    """Raised inside the atomic directory to drop it (the variant has no loadable model)."""


def build_variants(
    plan: ExportPlan,
    framework: str,
    fp32_dir: Path,
    expected: Sequence[Mapping[str, np.ndarray]],
    *,
    reference: str,
    checkpoint_sha256: str | None = None,
) -> tuple[VariantResult, ...]:
    """Make, judge and publish every variant in ``plan.variants`` of the bundle at ``fp32_dir``.

    Args:
        plan: the model's export plan (variants, options, runs, tolerance overrides).
        framework: the framework of the float32 bundle.
        fp32_dir: the published float32 bundle.
        expected: the framework's outputs for each of ``plan.runs``.
        reference: the reference runtime's name (``"torch"``, ``"jax"``).
        checkpoint_sha256: the state's content hash (None: seeded), for each variant's
            ``built_from`` record (``exporter.provenance``).

    Returns:
        One :class:`~exporter.variants.VariantResult` per variant, in plan order, with
        ``path`` the published variant's ``model.onnx`` (None when skipped or not published).
    """
    from exporter import variants

    spec = plan.spec
    src = fp32_dir / _ONNX
    fp32_manifest = json.loads((fp32_dir / _MANIFEST).read_text(encoding="utf-8"))
    # The user's --inputs are the last run (parity.plan_runs): with them, static int8 is
    # calibrated on them; without, on the sweep's inputs.
    calibration = [dict(plan.runs[-1][2])] if len(plan.runs) > len(plan.cases) else None
    results = []
    for name in plan.variants:
        final = fp32_dir.parent / bundle_name(framework, name)
        why = variants.skip_reason(name, spec, src)
        if why is not None:
            results.append(variants.VariantResult(name, spec.name, framework, None, "skipped", reason=why))
            continue
        t = time.perf_counter()
        outcome: list[VariantResult] = []
        try:
            with atomic.atomic_dir(final) as tmp:
                res = variants.apply(
                    name, spec, src, tmp / _ONNX, runs=plan.runs, expected=expected, framework=framework, reference=reference,
                    options=(plan.variant_options or {}).get(name), calibration=calibration, atol=plan.atol, rtol=plan.rtol,
                    threads=plan.intra_op_threads or 1,
                )  # fmt: skip
                outcome.append(res)
                if res.parity is None or not (tmp / _ONNX).is_file():
                    raise _NotPublished
                built_from = provenance.record(plan, framework, checkpoint_sha256, variant=name)
                _write(tmp, fp32_dir, fp32_manifest, res, time.perf_counter() - t, built_from)
        except _NotPublished:
            results.append(replace(outcome[0], path=None))
            continue
        results.append(replace(outcome[0], path=final / _ONNX))
    return tuple(results)


def _utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _write(
    tmp: Path, fp32_dir: Path, fp32: Mapping[str, Any], res: VariantResult, seconds: float, built_from: Mapping[str, Any]
) -> None:
    """The variant bundle's files in ``tmp`` (plain writes: ``atomic_dir`` fsyncs once)."""
    assert res.parity is not None and res.metrics is not None and res.info is not None
    for s in fp32["test_data_sets"]:
        shutil.copytree(fp32_dir / s["dir"], tmp / s["dir"])
    parity_doc = {
        **res.parity.to_dict(),
        "variant": res.variant,
        "verdict": res.status,
        "elementwise_decides": res.elementwise_decides,
        "metrics": res.metrics.to_dict(),
        "variant_info": res.info.to_dict(),
    }
    (tmp / _PARITY_JSON).write_text(json.dumps(parity_doc, indent=2, allow_nan=False), encoding="utf-8")
    (tmp / _PARITY_JUNIT).write_text(res.parity.to_junit_xml(), encoding="utf-8")
    files = provenance.file_table(tmp)  # every file but the manifest (incremental exports check them)
    manifest = {
        **{k: v for k, v in fp32.items() if k not in ("created", "seconds", "export_warnings")},
        "variant": res.variant,
        "source_bundle": fp32_dir.name,
        "onnx": {"file": _ONNX, "sha256": files[_ONNX]["sha256"], "bytes": files[_ONNX]["bytes"], "external_data": None},
        "tolerances": {**fp32["tolerances"], "per_output": {o: t.to_dict() for o, t in res.tolerances.items()}},
        "verdict": res.status,
        "elementwise_decides": res.elementwise_decides,
        "metrics": {"kinds": dict(res.kinds), "thresholds": {o: dict(t) for o, t in res.thresholds.items()}, "report": res.metrics.to_dict()},
        "variant_info": res.info.to_dict(),
        "parity": {
            "ok": res.ok,
            "reference": res.parity.reference,
            "candidate": res.parity.candidate,
            "report": _PARITY_JSON,
            "junit": _PARITY_JUNIT,
            "failures": res.failures() if not res.ok else [],
        },
        # its result, as `export` reports it, for a later export that finds it up to date
        "result": {**res.to_dict(), "path": None},
        provenance.RECORD_KEY: dict(built_from),
        provenance.FILES_KEY: files,
        "seconds": {"variant": round(seconds, 3)},
        "created": _utc_now(),
    }
    (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- verify
def _metric_check(m: Any) -> OutputCheck:
    from exporter.parity import OutputCheck

    return OutputCheck(
        output=m.output, case=f"metric {m.name}", dims={}, shape=None, dtype=f"{m.kind} metric", atol=m.threshold, rtol=0.0,
        rel_floor=0.0, max_abs=None, max_rel=None, mean_abs=None, p99_abs=None, n_bad=0 if m.ok else 1, n_total=1,
        nan_mismatch=0, ok=m.ok, reason="" if m.ok else m.line(),
    )  # fmt: skip


def variant_checks(
    root: Path, manifest: Mapping[str, Any], rt: Runtime, sets: Sequence[Mapping[str, Any]], checks: Sequence[OutputCheck]
) -> list[OutputCheck] | None:
    """The checks of a variant bundle's verification; None for a plain (float32) bundle.

    The elementwise ``checks`` (run with the variant's recorded tolerances) stay in the
    verdict when the variant's ``elementwise_decides``; int8's are left out (its verdict is
    its task metrics; the elementwise statistics of the export are in its parity.json).
    One check per task metric follows, recomputed here from the runtime's outputs with the
    kinds and thresholds recorded in the manifest (case ``"metric <name>"``; a failing one
    carries the metric's line as its reason).

    Raises:
        BundleError: the manifest's ``metrics`` record is malformed.
    """
    from exporter import metrics

    if manifest.get("variant") in (None, "fp32"):
        return None
    record = manifest.get("metrics")
    if not (isinstance(record, Mapping) and isinstance(record.get("kinds"), Mapping) and isinstance(record.get("thresholds"), Mapping)):
        raise BundleError(f"bundle {str(root)!r} is a {manifest.get('variant')!r} variant without a valid 'metrics' record; re-export it")
    integrity = [c for c in checks if c.case == "integrity"]
    elementwise = [c for c in checks if c.case != "integrity"]
    refs, got = [], []
    for s in sets:
        inputs, expected = testdata.read_test_data(root / s["dir"])
        refs.append(expected)
        try:
            got.append(rt.run(inputs))
        except RunError:  # the elementwise checks already carry the runtime's error
            got.append({})
    report = metrics.evaluate(refs, got, dict(record["kinds"]), {o: dict(t) for o, t in record["thresholds"].items()}, variant=str(manifest["variant"]))
    kept = elementwise if manifest.get("elementwise_decides", True) else []
    return integrity + kept + [_metric_check(m) for m in report.metrics]

