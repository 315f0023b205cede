"""Task-level metrics: does a reduced-precision model still do the model's job?

Elementwise tolerances alone cannot judge an int8 model (every element moves a little;
what matters is whether the embedding still points the same way and the classifier still
picks the same class).  Each output has a *kind*, and each kind has metrics:

    kind        metrics (over rows = every leading index, the last axis is the vector)
    embedding   cosine_min, cosine_mean   cosine similarity of candidate and reference rows
    hidden      cosine_min, cosine_mean   (hidden states: same metric, own thresholds)
    logits      top1, top5                top-1 agreement: rows whose argmax matches;
                                          top-5 agreement: mean overlap |top5(c) & top5(r)| / 5
    exact       (none; integer outputs are compared exactly by the elementwise check)

A row that is (near) zero in both reference and candidate (a padded position) has
cosine 1; zero in only one of them, cosine 0.  Rows of every case of a sweep are pooled,
so ``cosine_min`` is the worst row seen anywhere and ``top1`` the share over all rows.

Each metric carries its threshold and verdict; :class:`MetricReport` is the set for one
(model, variant) with ``bool(report)`` the verdict.  Thresholds come from
:data:`DEFAULT_THRESHOLDS` (per variant, per kind), then the model's
``variant_thresholds`` (per variant, keyed by kind or by output name), then the caller's
overrides (keyed by output name or kind).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec

__all__ = [
    "KINDS",
    "METRICS",
    "DEFAULT_THRESHOLDS",
    "Metric",
    "MetricReport",
    "cosine_rows",
    "topk_agreement",
    "output_kinds",
    "spec_problems",
    "thresholds_for",
    "evaluate",
]

#: Output kind -> the metrics computed for it.
METRICS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "embedding": ("cosine_min", "cosine_mean"),
        "hidden": ("cosine_min", "cosine_mean"),
        "logits": ("top1", "top5"),
        "exact": (),
    }
)
KINDS: tuple[str, ...] = tuple(METRICS)

#: Variant -> kind -> metric -> the lowest passing value.  fp32 and optimized must be
#: numerically the export itself (their elementwise float32 tolerance decides; these
#: thresholds only catch a gross failure the tolerances would also catch); fp16 is
#: stricter than int8.  Hidden states get a looser int8 bar than the embedding a user
#: consumes: measured on the real all-MiniLM-L6-v2 with the accuracy guard, token-level
#: cosine of last_hidden_state trails the sentence embedding's (see exporter.variants.int8).
DEFAULT_THRESHOLDS: Mapping[str, Mapping[str, Mapping[str, float]]] = MappingProxyType(
    {
        "fp32": {
            "embedding": {"cosine_min": 0.9999, "cosine_mean": 0.9999},
            "hidden": {"cosine_min": 0.9999, "cosine_mean": 0.9999},
            "logits": {"top1": 0.99, "top5": 0.99},
        },
        "optimized": {
            "embedding": {"cosine_min": 0.9999, "cosine_mean": 0.9999},
            "hidden": {"cosine_min": 0.9999, "cosine_mean": 0.9999},
            "logits": {"top1": 0.99, "top5": 0.99},
        },
        "fp16": {
            "embedding": {"cosine_min": 0.999, "cosine_mean": 0.9995},
            "hidden": {"cosine_min": 0.999, "cosine_mean": 0.9995},
            "logits": {"top1": 0.999, "top5": 0.99},
        },
        "int8": {
            "embedding": {"cosine_min": 0.99, "cosine_mean": 0.995},
            "hidden": {"cosine_min": 0.95, "cosine_mean": 0.98},
            "logits": {"top1": 0.99, "top5": 0.95},
        },
    }
)

_ZERO_NORM = 1e-12


@dataclass(frozen=True)
class Metric:
    """One task metric of one output: its value, the threshold and whether it passes."""

    output: str
    kind: str
    name: str
    value: float
    threshold: float
    rows: int

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.value)) and self.value >= self.threshold

    def __bool__(self) -> bool:
        return self.ok

    def line(self) -> str:
        """``"sentence_embedding cosine_min 0.9012 < 0.99 (FAIL, 1245 rows)"``."""
        op = ">=" if self.ok else "<"
        return f"{self.output} {self.name} {self.value:.6g} {op} {self.threshold:g} ({'ok' if self.ok else 'FAIL'}, {self.rows} rows)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "kind": self.kind,
            "metric": self.name,
            "value": self.value if np.isfinite(self.value) else None,
            "threshold": self.threshold,
            "rows": self.rows,
            "ok": self.ok,
        }


@dataclass(frozen=True)
class MetricReport:
    """Every task metric of one candidate against the framework's outputs.

    ``bool(report)`` is True when every metric meets its threshold (and there is at
    least one, or no output has a kind with metrics).
    """

    variant: str
    metrics: tuple[Metric, ...]

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.metrics)

    def __bool__(self) -> bool:
        return self.ok

    def failures(self) -> list[str]:
        """One line per failing metric, sorted, naming output, metric, value and threshold."""
        return sorted(m.line() for m in self.metrics if not m.ok)

    def get(self, output: str, name: str) -> Metric:
        for m in self.metrics:
            if m.output == output and m.name == name:
                return m
        raise KeyError((output, name))

    def shortfall(self) -> float:
        """How far the worst metric is below its bar, relative to the bar's headroom.

        ``max((threshold - value) / (1 - threshold))`` over the metrics (0 when all pass);
        used to rank candidate models by how close they come.
        """
        worst = 0.0
        for m in self.metrics:
            head = max(1.0 - m.threshold, 1e-9)
            value = m.value if np.isfinite(m.value) else -1.0
            worst = max(worst, (m.threshold - value) / head)
        return worst

    def table(self) -> str:
        rows = [("output", "kind", "metric", "value", "threshold", "verdict")]
        for m in self.metrics:
            rows.append((m.output, m.kind, m.name, f"{m.value:.6g}", f"{m.threshold:g}", "ok" if m.ok else "FAIL"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        head = f"task metrics ({self.variant}): {'PASS' if self.ok else 'FAIL'}"
        return "\n".join([head] + ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows])

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "ok": self.ok,
            "metrics": [m.to_dict() for m in self.metrics],
            "failures": self.failures(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricReport:
        """Inverse of :meth:`to_dict` (a missing value, written as null, reads back as NaN)."""
        return cls(
            variant=str(d["variant"]),
            metrics=tuple(
                Metric(m["output"], m["kind"], m["metric"], float("nan") if m["value"] is None else float(m["value"]),
                       float(m["threshold"]), int(m["rows"]))  # fmt: skip
                for m in d["metrics"]
            ),
        )


# ---------------------------------------------------------------------------------------
# the metrics themselves
# ---------------------------------------------------------------------------------------
def _rows(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a.reshape(1, -1)
    return a.reshape(-1, a.shape[-1])


def cosine_rows(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (last axis) of ``candidate`` with ``reference``'s.

    Rows that are zero (norm <= 1e-12) in both get 1, in only one of them 0; a row with a
    non-finite value gets NaN (which fails every threshold).

    Raises:
        UsageError: the shapes differ.
    """
    if np.shape(reference) != np.shape(candidate):
        raise UsageError(f"cosine: shapes differ: reference {np.shape(reference)}, candidate {np.shape(candidate)}")
    r, c = _rows(reference), _rows(candidate)
    with np.errstate(over="ignore", invalid="ignore"):
        nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
        dot = (r * c).sum(axis=1)
        cos = dot / np.maximum(nr * nc, _ZERO_NORM * _ZERO_NORM)
    zr, zc = nr <= _ZERO_NORM, nc <= _ZERO_NORM
    cos = np.where(zr & zc, 1.0, np.where(zr | zc, 0.0, np.clip(cos, -1.0, 1.0)))
    finite = np.isfinite(r).all(axis=1) & np.isfinite(c).all(axis=1)
    return np.where(finite, cos, np.nan)


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int) -> float:
    """Agreement of the top-``k`` classes (last axis) of each row, averaged over rows.

    ``k == 1``: the share of rows whose argmax is the same.  ``k > 1``: the mean of
    ``|topk(candidate) & topk(reference)| / k`` (``k`` capped at the number of classes).
    A row with a non-finite value counts as disagreeing.

    Raises:
        UsageError: the shapes differ, or ``k < 1``.
    """
    if np.shape(reference) != np.shape(candidate):
        raise UsageError(f"top-{k}: shapes differ: reference {np.shape(reference)}, candidate {np.shape(candidate)}")
    if k < 1:
        raise UsageError(f"top-k agreement needs k >= 1, got {k}")
    r, c = _rows(reference), _rows(candidate)
    if r.shape[0] == 0:
        return 1.0
    finite = np.isfinite(r).all(axis=1) & np.isfinite(c).all(axis=1)
    k = min(k, r.shape[1])
    if k == 1:
        agree = (np.argmax(r, axis=1) == np.argmax(c, axis=1)).astype(np.float64)
    else:
        # stable sort: ties broken by index, the same way for both
        tr = np.argsort(-r, axis=1, kind="stable")[:, :k]
        tc = np.argsort(-c, axis=1, kind="stable")[:, :k]
        agree = np.array([len(set(a) & set(b)) / k for a, b in zip(tr.tolist(), tc.tolist())], dtype=np.float64)
    return float(np.where(finite, agree, 0.0).mean())


# ---------------------------------------------------------------------------------------
# kinds and thresholds
# ---------------------------------------------------------------------------------------
def output_kinds(spec: ModelSpec, dtypes: Mapping[str, str] | None = None) -> dict[str, str]:
    """The kind of each of ``spec``'s outputs.

    The spec's ``output_kinds``; an output it does not name is ``exact`` when ``dtypes``
    says it is an integer/bool output, else ``hidden`` (so every float output is judged by
    a metric).  (``ModelSpec`` checks its kinds when it is made: see :func:`spec_problems`.)
    """
    declared = dict(spec.output_kinds)
    kinds = {}
    for o in spec.outputs:
        if o in declared:
            kinds[o] = declared[o]
        elif dtypes is not None and np.dtype(dtypes.get(o, "float32")).kind in "iub":
            kinds[o] = "exact"
        else:
            kinds[o] = "hidden"
    return kinds


def spec_problems(spec: ModelSpec) -> list[str]:
    """What is wrong with a spec's ``output_kinds``, ``variant_thresholds`` and
    ``variant_tolerances`` (one line each; empty: nothing).  ``ModelSpec`` calls this."""
    from exporter.models.registry import Tolerance

    out: list[str] = []
    outputs = set(spec.outputs) if isinstance(spec.outputs, tuple) else set()
    kinds = spec.output_kinds if isinstance(spec.output_kinds, Mapping) else {}
    if not isinstance(spec.output_kinds, Mapping):
        out.append(f"output_kinds must be a dict of output -> kind, got {type(spec.output_kinds).__name__}")
    for o, k in kinds.items():
        if o not in outputs:
            out.append(f"output_kinds names output {o!r}, which the model does not have (outputs: {', '.join(sorted(outputs))})")
        if k not in METRICS:
            out.append(f"output_kinds[{o!r}] is {k!r}; kinds are: {', '.join(KINDS)}")
    for field_name in ("variant_thresholds", "variant_tolerances"):
        table = getattr(spec, field_name)
        if not isinstance(table, Mapping):
            out.append(f"{field_name} must be a dict keyed by variant, got {type(table).__name__}")
            continue
        for variant, entries in table.items():
            if variant not in DEFAULT_THRESHOLDS:
                out.append(f"{field_name} names variant {variant!r}; variants are: {', '.join(DEFAULT_THRESHOLDS)}")
            if not isinstance(entries, Mapping):
                out.append(f"{field_name}[{variant!r}] must be a dict, got {type(entries).__name__}")
                continue
            for key, value in entries.items():
                if field_name == "variant_tolerances":
                    if key not in outputs:
                        out.append(f"variant_tolerances[{variant!r}] names output {key!r}, which the model does not have")
                    if not isinstance(value, Tolerance):
                        out.append(f"variant_tolerances[{variant!r}][{key!r}] must be a Tolerance, got {value!r}")
                    continue
                kind = key if key in METRICS else kinds.get(key, "hidden" if key in outputs else None)
                if kind is None:
                    out.append(f"variant_thresholds[{variant!r}] key {key!r} is neither an output nor a kind")
                    continue
                for metric, v in (value.items() if isinstance(value, Mapping) else ()):
                    if metric not in METRICS.get(kind, ()):
                        out.append(f"variant_thresholds[{variant!r}][{key!r}]: metric {metric!r} does not apply to kind {kind!r}")
                    elif not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) <= 1.0):
                        out.append(f"variant_thresholds[{variant!r}][{key!r}][{metric!r}] must be a number in [0, 1], got {v!r}")
    return out


def thresholds_for(
    spec: ModelSpec,
    variant: str,
    kinds: Mapping[str, str],
    overrides: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Output -> metric -> threshold for ``variant``.

    Precedence (later wins): :data:`DEFAULT_THRESHOLDS[variant][kind]`, the spec's
    ``variant_thresholds[variant]`` (keys: a kind or an output name), ``overrides``
    (keys: a kind or an output name).

    Raises:
        UsageError: unknown variant, a metric the output's kind does not have, a key that
            is neither a kind nor an output, or a threshold outside [0, 1].
    """
    if variant not in DEFAULT_THRESHOLDS:
        raise UsageError(f"no task-metric thresholds for variant {variant!r}; known: {', '.join(DEFAULT_THRESHOLDS)}")
    layers = [dict(spec.variant_thresholds.get(variant, {})), overrides or {}]
    problems = []
    for layer in layers:
        for key, values in layer.items():
            if key not in METRICS and key not in kinds:
                problems.append(f"threshold key {key!r} is neither an output of {spec.name!r} ({', '.join(kinds)}) nor a kind")
                continue
            allowed = METRICS[key] if key in METRICS else METRICS[kinds[key]]
            for metric, v in dict(values).items():
                if metric not in allowed:
                    problems.append(f"metric {metric!r} does not apply to {key!r} (it has: {', '.join(allowed) or 'none'})")
                elif not (isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0):
                    problems.append(f"threshold {key}.{metric} must be a number in [0, 1], got {v!r}")
    if problems:
        raise UsageError(f"model {spec.name!r}, variant {variant!r}: bad metric thresholds: " + "; ".join(sorted(problems)))
    out: dict[str, dict[str, float]] = {}
    for o, kind in kinds.items():
        t = dict(DEFAULT_THRESHOLDS[variant].get(kind, {}))
        for layer in layers:
            t.update({m: float(v) for m, v in dict(layer.get(kind, {})).items()})
            t.update({m: float(v) for m, v in dict(layer.get(o, {})).items()})
        out[o] = {m: t[m] for m in METRICS[kind] if m in t}
    return out


def evaluate(
    references: Sequence[Mapping[str, np.ndarray]],
    candidates: Sequence[Mapping[str, np.ndarray]],
    kinds: Mapping[str, str],
    thresholds: Mapping[str, Mapping[str, float]],
    *,
    variant: str,
) -> MetricReport:
    """Task metrics of ``candidates`` against ``references`` (one dict per case, pooled).

    Args:
        references: the framework's outputs, one mapping per case.
        candidates: the candidate's outputs for the same cases.
        kinds: output -> kind (:func:`output_kinds`).
        thresholds: output -> metric -> threshold (:func:`thresholds_for`).
        variant: recorded in the report.

    Returns:
        One :class:`Metric` per (output, metric) in ``thresholds``, outputs in ``kinds`` order.
        An output missing from a candidate, or with another shape, makes its metrics NaN
        (failing).
    """
    assert len(references) == len(candidates), (len(references), len(candidates))
    metrics: list[Metric] = []
    for output, kind in kinds.items():
        names = [m for m in METRICS[kind] if m in thresholds.get(output, {})]
        if not names:
            continue
        usable = all(output in c and np.shape(c[output]) == np.shape(r[output]) for r, c in zip(references, candidates))
        if usable and references:
            ref_rows = np.concatenate([_rows(r[output]) for r in references], axis=0)
            cand_rows = np.concatenate([_rows(c[output]) for c in candidates], axis=0)
        for name in names:
            if not usable or not references:
                value, rows = float("nan"), 0
            elif name.startswith("cosine"):
                cos = cosine_rows(ref_rows, cand_rows)
                value = float(np.min(cos) if name == "cosine_min" else np.mean(cos)) if cos.size else 1.0
                rows = int(cos.size)
            else:
                value = topk_agreement(ref_rows, cand_rows, int(name[3:]))
                rows = int(ref_rows.shape[0])
            metrics.append(Metric(output, kind, name, value, float(thresholds[output][name]), rows))
    return MetricReport(variant=variant, metrics=tuple(metrics))
