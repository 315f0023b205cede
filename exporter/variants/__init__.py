"""Variants of an export that teams actually ship, each judged against the ORIGINAL framework.

    name        module                         tool
    optimized   exporter.variants.optimized    onnxruntime.transformers.optimizer / onnxruntime graph optimizer
    fp16        exporter.variants.fp16         onnxruntime.transformers.float16
    int8        exporter.variants.int8         onnxruntime.quantization (dynamic / static QDQ, accuracy guard)

Every module has the same small interface (see :mod:`exporter.variants.base`):
``applies(spec, model) -> str | None``, ``transform(src, dst, *, calibration, options,
judge) -> VariantInfo``, and its defaults (``DEFAULT_OPTIONS``, ``TOLERANCES``,
``ELEMENTWISE_DECIDES``; task-metric thresholds in
``exporter.metrics.DEFAULT_THRESHOLDS[name]``).

:func:`apply` makes one variant of a float32 export and judges it: the reference is the
framework's outputs on the sweep's cases (the same ones the float32 bundle is checked
on), never the float32 ONNX.  The verdict combines the task metrics
(:mod:`exporter.metrics`) and, where the variant says so, the elementwise check with the
variant's tolerance.  A variant a model cannot take is *skipped with its reason*.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any

from exporter.errors import ExportError, RunError, UsageError
from exporter.variants.base import Judge, VariantInfo

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from exporter.metrics import MetricReport
    from exporter.models.registry import ModelSpec, Tolerance
    from exporter.parity import ParityReport, Run

__all__ = ["VARIANTS", "VariantInfo", "VariantResult", "Judge", "get", "names", "parse", "apply", "skip_reason", "check"]

#: Variant name -> the module that makes it.
VARIANTS: Mapping[str, str] = MappingProxyType(
    {
        "optimized": "exporter.variants.optimized",
        "fp16": "exporter.variants.fp16",
        "int8": "exporter.variants.int8",
    }
)


def names() -> list[str]:
    """The variant names, in table order."""
    return list(VARIANTS)


def get(name: str) -> ModuleType:
    """The module of variant ``name``.

    Raises:
        UsageError: an unknown name (lists the known ones).
    """
    if name not in VARIANTS:
        raise UsageError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
    return importlib.import_module(VARIANTS[name])


def parse(text: str | Sequence[str] | None) -> list[str]:
    """``"optimized,int8"`` (or a list) -> the names, de-duplicated, in the order given.

    Raises:
        UsageError: an unknown name (every unknown one listed).
    """
    if text is None:
        return []
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in dict.fromkeys(items) if t]
    unknown = [t for t in items if t not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variant(s) {', '.join(map(repr, unknown))}; known variants: {', '.join(VARIANTS)}")
    return items


def check(requested: str | Sequence[str] | None, options: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[str, ...]:
    """Validate a request for variants and their options; the names, in order.

    Raises:
        UsageError: an unknown variant, options for a variant not requested, or an
            option a variant does not have (every problem listed).
    """
    from exporter.variants.base import check_options

    chosen = parse(requested)
    problems = []
    for name, opts in (options or {}).items():
        if name not in chosen:
            problems.append(f"options given for variant {name!r}, which is not requested (requested: {', '.join(chosen) or 'none'})")
            continue
        try:
            check_options(name, get(name).DEFAULT_OPTIONS, opts)
        except UsageError as e:
            problems.append(str(e))
    if problems:
        raise UsageError.listing("bad variant request", problems)
    return tuple(chosen)


@dataclass(frozen=True)
class VariantResult:
    """One variant of one (model, framework) export and its verdict.

    Attributes:
        variant: the variant name.
        model, framework: what was exported.
        path: the variant's ``.onnx`` (None when skipped).
        status: ``"pass"``, ``"fail"`` or ``"skipped"``.
        reason: why it was skipped or could not be made/run; empty otherwise.
        info: what the transform did (None when skipped or it failed).
        parity: the elementwise check against the framework (variant tolerances).
        metrics: the task metrics against the framework.
        elementwise_decides: whether ``parity`` is part of the verdict.
        kinds: output -> kind used for the metrics.
        thresholds: output -> metric -> threshold used.
        tolerances: output -> the elementwise Tolerance used (the variant's, --atol/--rtol applied).
    """

    variant: str
    model: str
    framework: str
    path: Path | None
    status: str
    reason: str = ""
    info: VariantInfo | None = None
    parity: ParityReport | None = None
    metrics: MetricReport | None = None
    elementwise_decides: bool = True
    kinds: Mapping[str, str] = field(default_factory=dict)
    thresholds: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    tolerances: Mapping[str, Tolerance] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """False only for a failing variant (a skipped one is not a failure)."""
        return self.status != "fail"

    def __bool__(self) -> bool:
        return self.ok

    def failures(self) -> list[str]:
        """Why it fails: the reason, every failing metric, and (when it decides) every elementwise failure."""
        lines = [self.reason] if self.status == "fail" and self.reason else []
        if self.metrics is not None:
            lines += [f"metric {line}" for line in self.metrics.failures()]
        if self.parity is not None and self.elementwise_decides:
            lines += [f"elementwise {line}" for line in self.parity.failures()]
        return lines

    def headline(self) -> str:
        what = f"{self.model} ({self.framework}, {self.variant})"
        if self.status == "skipped":
            return f"{what}: SKIPPED: {self.reason}"
        return f"{what}: {self.status.upper()}" + (f" -> {self.path}" if self.path else "")

    def table(self, elementwise: bool = True) -> str:
        """The headline, the transform's warnings, the task metrics and (``elementwise``),
        when it decides or fails, the elementwise table."""
        lines = [self.headline()]
        if self.info is not None:
            lines += [f"  warning: {w}" for w in self.info.warnings]
            d = self.info.details
            if "excluded" in d:
                lines.append(f"  kept in float: {len(d['excluded'])} of {d.get('candidates', '?')} nodes" + (f" ({', '.join(d['excluded'])})" if d["excluded"] else ""))
            if d.get("op_block_list") or d.get("node_block_list"):
                lines.append(f"  fp32 block list: ops {d.get('op_block_list')}, nodes {d.get('node_block_list')}")
            if "fusions" in d:
                lines.append(f"  fusions: {d['fusions']}")
        if self.status == "fail" and self.reason:
            lines.append(f"  {self.reason}")
        if self.metrics is not None:
            lines.append(self.metrics.table())
        if elementwise and self.parity is not None and (self.elementwise_decides or not self.parity.ok):
            lines.append(self.parity.table() + ("" if self.elementwise_decides else "\n  (elementwise: reported, the task metrics decide)"))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "model": self.model,
            "framework": self.framework,
            "path": None if self.path is None else str(self.path),
            "status": self.status,
            "ok": self.ok,
            "reason": self.reason,
            "info": None if self.info is None else self.info.to_dict(),
            "metrics": None if self.metrics is None else self.metrics.to_dict(),
            "parity": None if self.parity is None else self.parity.to_dict(),
            "elementwise_decides": self.elementwise_decides,
            "kinds": dict(self.kinds),
            "thresholds": {o: dict(t) for o, t in self.thresholds.items()},
            "tolerances": {o: t.to_dict() for o, t in self.tolerances.items()},
            "failures": self.failures(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VariantResult:
        """Inverse of :meth:`to_dict` (e.g. ``export --json`` read back)."""
        from exporter.metrics import MetricReport
        from exporter.models.registry import Tolerance
        from exporter.parity import ParityReport

        info = d.get("info")
        return cls(
            variant=d["variant"], model=d["model"], framework=d["framework"],
            path=None if d.get("path") is None else Path(d["path"]), status=d["status"], reason=d.get("reason", ""),
            info=None if info is None else VariantInfo(info["variant"], info["tool"], info["tool_version"], dict(info["options"]),
                                                       dict(info["details"]), tuple(info["warnings"])),
            parity=None if d.get("parity") is None else ParityReport.from_dict(d["parity"]),
            metrics=None if d.get("metrics") is None else MetricReport.from_dict(d["metrics"]),
            elementwise_decides=bool(d.get("elementwise_decides", True)), kinds=dict(d.get("kinds", {})),
            thresholds={o: dict(t) for o, t in d.get("thresholds", {}).items()},
            tolerances={o: Tolerance(float(t["atol"]), float(t["rtol"])) for o, t in d.get("tolerances", {}).items()},
        )  # fmt: skip


def _tolerances(module: ModuleType, spec: ModelSpec, name: str, dtypes: Mapping[str, str]) -> dict[str, Any]:
    """Per-output elementwise tolerances of ``name``: the spec's ``variant_tolerances[name]``
    (output -> Tolerance), else the variant's per-dtype default, else the model's own."""
    own = dict(spec.variant_tolerances.get(name, {}))
    out: dict[str, Any] = {}
    for o, dt in dtypes.items():
        if o in own:
            out[o] = own[o]
        elif dt in module.TOLERANCES:
            out[o] = module.TOLERANCES[dt]
    return out


def apply(
    name: str,
    spec: ModelSpec,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    runs: Sequence[Run],
    expected: Sequence[Mapping[str, np.ndarray]],
    framework: str,
    reference: str | None = None,
    options: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    threads: int = 1,
) -> VariantResult:
    """Make variant ``name`` of the float32 export ``src`` at ``dst`` and judge it against the framework.

    Args:
        name: ``"optimized"``, ``"fp16"`` or ``"int8"``.
        spec: the registry model.
        src: the float32 ``model.onnx``.
        dst: where the variant's ``.onnx`` goes.
        runs: the sweep's cases (``exporter.parity.plan_runs``).
        expected: the framework's outputs for each run.
        framework: ``"torch"`` or ``"flax"`` (recorded).
        reference: the reference runtime's name (default: the framework's).
        options: the variant's options (its ``DEFAULT_OPTIONS`` fill the rest).
        thresholds: task-metric overrides, keyed by output name or kind.
        calibration: calibration inputs (default: the runs' inputs).
        atol, rtol: elementwise overrides.
        threads: onnxruntime intra-op threads for judging and timing.

    Returns:
        The :class:`VariantResult`: ``skipped`` with the reason when the model cannot take
        the variant; ``fail`` with the reason when the tool or onnxruntime fails on it.

    Raises:
        UsageError: unknown variant, bad options, thresholds or tolerances.
    """
    import onnx

    from exporter import metrics, parity
    from exporter.variants.base import check_options

    module = get(name)
    check_options(name, module.DEFAULT_OPTIONS, options)  # bad options fail before any work
    src, dst = Path(src), Path(dst)
    dtypes = {o: str(expected[0][o].dtype) for o in spec.outputs if expected and o in expected[0]}
    kinds = metrics.output_kinds(spec, dtypes)
    limits = metrics.thresholds_for(spec, name, kinds, thresholds)
    out_tol = _tolerances(module, spec, name, dtypes)
    # The variant's tolerances are the base that --atol/--rtol override (as a bundle's recorded ones are).
    tol = parity.tolerance_for(spec, atol=atol, rtol=rtol, recorded={"per_output": out_tol})
    decides = bool(module.ELEMENTWISE_DECIDES)
    why = module.applies(spec, onnx.load(str(src), load_external_data=False))
    if why is not None:
        return VariantResult(name, spec.name, framework, None, "skipped", reason=why, elementwise_decides=decides)
    recorded = dict(kinds=kinds, thresholds=limits, tolerances={o: tol(o, dt) for o, dt in dtypes.items()})
    feeds = [feed for _label, _dims, feed in runs]
    judge = Judge(feeds, expected, kinds, limits, variant=name, threads=threads)
    calib = [dict(f) for f in (calibration if calibration is not None else feeds)]
    try:
        info = module.transform(src, dst, calibration=calib, options=options, judge=judge)
        outputs = judge.outputs(dst)
    except (ExportError, RunError) as e:
        path = dst if dst.exists() else None
        return VariantResult(
            name, spec.name, framework, path, "fail", reason=f"{type(e).__name__}: {e}", elementwise_decides=decides, **recorded
        )
    report = judge.metrics(dst, outputs)
    checks = []
    for (label, dims, _feed), want, got in zip(runs, expected, outputs):
        checks += parity.compare(dict(want), got, tol, case=label, dims=dims)
    elementwise = parity.ParityReport(
        model=spec.name, framework=framework, reference=reference or framework,
        candidate=f"onnxruntime ({name})", checks=tuple(checks),
    )  # fmt: skip
    ok = report.ok and (elementwise.ok or not decides)
    return VariantResult(
        name, spec.name, framework, dst, "pass" if ok else "fail",
        info=info, parity=elementwise, metrics=report, elementwise_decides=decides, **recorded,
    )  # fmt: skip


def skip_reason(name: str, spec: ModelSpec, src: str | os.PathLike[str]) -> str | None:
    """Why ``spec``'s export at ``src`` cannot take variant ``name`` (None: it can).

    Raises:
        UsageError: an unknown variant.
    """
    import onnx

    return get(name).applies(spec, onnx.load(os.fspath(src), load_external_data=False))
