"""``int8``: quantization with an accuracy guard judged against the framework's outputs.

Modes (``onnxruntime.quantization``):

* ``dynamic`` (default): ``quantize_dynamic``, int8 weights (``QInt8``), activations
  quantized at run time; per-channel weights by default (measured on the real
  all-MiniLM-L6-v2: sentence-embedding cosine min 0.976 per-channel vs 0.896 per-tensor);
* ``static``: ``quantize_static`` in QDQ format, activations calibrated (MinMax) on the
  calibration inputs (the sweep's, or the user's ``--inputs``).

**Accuracy guard** (on by default; needs a :class:`~exporter.variants.base.Judge`): the
quantized model's task metrics are computed against the framework's outputs.  When they
miss their thresholds, every candidate node (MatMul, Gemm, Conv, Gather the quantizer
would touch) is quantized *alone* and ranked by the error it causes; the most harmful are
kept in float, growing the excluded prefix 1, 2, 4, ... of that ranking and then
bisecting, until the thresholds are met or every candidate is excluded.  The excluded
nodes, the search, and the latency of the unguarded and guarded models are recorded.
When no quantized model meets the bar the unguarded model is written, the result carries
``guard.met = False`` and a warning, and the verdict fails on the metrics it misses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter import deps
from exporter.errors import ExportError, UsageError
from exporter.models.registry import Tolerance
from exporter.variants.base import Judge, VariantInfo, check_options, latency_ms, model_bytes, timing_feed, tool_version

if TYPE_CHECKING:  # pragma: no cover
    from exporter.metrics import MetricReport
    from exporter.models.registry import ModelSpec

__all__ = ["NAME", "TOOL", "DEFAULT_OPTIONS", "TOLERANCES", "ELEMENTWISE_DECIDES", "QUANTIZABLE_OPS", "applies", "transform", "candidates"]

NAME = "int8"
TOOL = "onnxruntime.quantization"
DEFAULT_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {
        "mode": "dynamic",
        "per_channel": True,
        "guard": True,
        "nodes_to_exclude": (),
        "max_steps": 24,
        "measure_latency": True,
    }
)
#: Recorded beside the metrics; not the verdict (ELEMENTWISE_DECIDES is False): an int8
#: model moves every element, so only the task metrics can say whether it still works.
TOLERANCES: Mapping[str, Tolerance] = MappingProxyType({"float32": Tolerance(5e-2, 5e-2)})
ELEMENTWISE_DECIDES = False
#: Op types whose nodes the guard may keep in float.
QUANTIZABLE_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv", "Gather")


@contextmanager
def _quiet() -> Iterator[None]:
    # onnxruntime.quantization logs a pre-processing hint through the root logger on every call
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# The operand holding the weights, per op type.
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}


def candidates(model: Any) -> list[str]:
    """Names of the nodes whose weights (an initializer) the quantizer would turn into int8.

    MatMul/Gemm/Conv with a constant second operand, Gather from a constant table (an
    embedding).  Nodes without a name cannot be excluded by name and are not candidates.
    """
    inits = {t.name for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        k = _WEIGHT_INPUT.get(n.op_type)
        if k is not None and n.name and len(n.input) > k and n.input[k] in inits:
            out.append(n.name)
    return out


def applies(spec: ModelSpec | None, model: Any) -> str | None:
    """None when the graph has a MatMul/Gemm/Conv/Gather with constant weights, else the reason."""
    if not candidates(model):
        return f"the model has no named {'/'.join(QUANTIZABLE_OPS)} node with constant weights: nothing to quantize to int8"
    return None


def gemm_to_matmul(model: Any) -> int:
    """Rewrite plain ``Gemm`` nodes (constant B, alpha = beta = 1, no transA) as ``MatMul`` (+ ``Add``), in place.

    ``quantize_dynamic`` has no integer Gemm (onnxruntime's dynamic registry quantizes
    MatMul, Conv, Gather): without this, a classifier made of Linear layers would keep
    every weight in float.  The MatMul keeps the Gemm's name (so exclusion lists name the
    same nodes); a transposed B is stored transposed.  Returns the number rewritten.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    new_nodes = []
    count = 0
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        plain = (
            n.op_type == "Gemm" and len(n.input) >= 2 and n.input[1] in inits and attrs.get("transA", 0) == 0
            and float(attrs.get("alpha", 1.0)) == 1.0 and float(attrs.get("beta", 1.0)) == 1.0
        )  # fmt: skip
        if not plain:
            new_nodes.append(n)
            continue
        b_name = n.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[b_name]).T.copy()
            b_name = f"{n.input[1]}__transposed"
            if b_name not in inits:
                t = numpy_helper.from_array(w, name=b_name)
                model.graph.initializer.append(t)
                inits[b_name] = t
        has_bias = len(n.input) >= 3 and n.input[2] != ""
        mm_out = f"{n.output[0]}__matmul" if has_bias else n.output[0]
        new_nodes.append(helper.make_node("MatMul", [n.input[0], b_name], [mm_out], name=n.name))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}__bias"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return count


class _Reader:
    """A ``CalibrationDataReader`` over a list of feeds (restartable)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], names: set[str]) -> None:
        self._feeds = [{k: np.asarray(v) for k, v in f.items() if k in names} for f in feeds]
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def _quantize(src: Path, dst: Path, opts: Mapping[str, Any], calibration: Sequence[Mapping[str, np.ndarray]], exclude: Sequence[str]) -> None:
    q = deps.require("onnxruntime.quantization", "the int8 variant")
    try:
        with _quiet():
            if opts["mode"] == "dynamic":
                q.quantize_dynamic(
                    str(src), str(dst), weight_type=q.QuantType.QInt8, per_channel=bool(opts["per_channel"]),
                    nodes_to_exclude=list(exclude), op_types_to_quantize=list(QUANTIZABLE_OPS),
                )  # fmt: skip
            else:
                import onnx

                names = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
                q.quantize_static(
                    str(src), str(dst), _Reader(calibration, names), quant_format=q.QuantFormat.QDQ,
                    per_channel=bool(opts["per_channel"]), activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                    calibrate_method=q.CalibrationMethod.MinMax, nodes_to_exclude=list(exclude),
                    op_types_to_quantize=list(QUANTIZABLE_OPS),
                )  # fmt: skip
    except Exception as e:  # the quantizer's own failures on a graph it does not expect
        raise ExportError(f"variant 'int8': {opts['mode']} quantization of {src} failed: {type(e).__name__}: {e}") from e


def _rank(src: Path, work: Path, opts: Mapping[str, Any], calibration: Sequence[Mapping[str, np.ndarray]], names: Sequence[str], judge: Judge) -> list[tuple[str, float]]:
    """Each candidate quantized alone (all others kept in float), ranked by the error it causes."""
    scored = []
    for i, name in enumerate(names):
        out = work / f"rank_{i}.onnx"
        _quantize(src, out, opts, calibration, [n for n in names if n != name])
        scored.append((name, judge.error(out)))
        out.unlink()
    scored.sort(key=lambda x: (-x[1] if np.isfinite(x[1]) else -np.inf, x[0]))
    return scored


def transform(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    calibration: list[dict[str, np.ndarray]],
    options: Mapping[str, Any] | None = None,
    judge: Judge | None = None,
) -> VariantInfo:
    """Quantize ``src`` to int8 at ``dst``, keeping nodes in float until ``judge``'s thresholds are met.

    Args:
        src: the float32 ``model.onnx``.
        dst: where to write the int8 model.
        calibration: static mode's calibration inputs (the sweep's or the user's).
        options: see :data:`DEFAULT_OPTIONS`.
        judge: scores candidates against the framework's outputs; required when the guard is on.

    Returns:
        The :class:`VariantInfo`; ``details`` holds the candidates, ``excluded`` nodes, the
        ranking, the search steps, ``guard`` (``met``, metrics failures), bytes and
        latencies (fp32, unguarded int8, int8).

    Raises:
        UsageError: bad options, or the guard on without a judge.
        ExportError: the quantizer failed.
    """
    import onnx

    opts = check_options(NAME, DEFAULT_OPTIONS, options)
    if opts["mode"] not in ("dynamic", "static"):
        raise UsageError(f"variant 'int8': mode must be dynamic or static, got {opts['mode']!r}")
    if opts["mode"] == "static" and not calibration:
        raise UsageError("variant 'int8': static quantization needs calibration inputs (the sweep's or --inputs)")
    if opts["guard"] and judge is None:
        raise UsageError("variant 'int8': the accuracy guard needs a judge (the framework's outputs); pass judge= or guard=False")
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src), load_external_data=False)
    names = candidates(model)
    user_excluded = list(opts["nodes_to_exclude"])
    unknown = sorted(set(user_excluded) - {n.name for n in model.graph.node})
    if unknown:
        raise UsageError(f"variant 'int8': nodes_to_exclude names nodes the model does not have: {', '.join(unknown)}")
    warnings: list[str] = []
    details: dict[str, Any] = {"mode": opts["mode"], "candidates": len(names)}
    work = dst.parent / f".{dst.stem}.work"
    work.mkdir(exist_ok=True)
    try:
        source = src
        if opts["mode"] == "dynamic":
            model = onnx.load(str(src))
            details["gemm_as_matmul"] = gemm_to_matmul(model)
            if details["gemm_as_matmul"]:
                source = work / "fp32.onnx"
                onnx.save(model, str(source))
        del model
        unguarded = work / "unguarded.onnx"
        _quantize(source, unguarded, opts, calibration, user_excluded)
        excluded = list(user_excluded)
        chosen = unguarded
        if judge is not None:
            report = judge.metrics(unguarded)
            details["unguarded_metrics"] = {"ok": report.ok, "failures": report.failures()}
            if opts["guard"] and not report.ok:
                chosen, excluded, report = _guard(source, work, opts, calibration, names, user_excluded, judge, details, report)
            details["guard"] = {"enabled": bool(opts["guard"]), "met": report.ok, "failures": report.failures()}
            if not report.ok and opts["guard"]:
                warnings.append(
                    "accuracy guard: no int8 model meets the thresholds, even with all but one candidate node kept in "
                    "float; the unguarded model is written and fails: " + "; ".join(report.failures())
                )
        os.replace(chosen, dst)
        details["excluded"] = excluded
        details["quantized_nodes"] = len([n for n in names if n not in excluded])
        details["model_bytes"] = {"fp32": model_bytes(src), "int8": model_bytes(dst)}
        details["model_bytes"]["ratio"] = round(details["model_bytes"]["int8"] / details["model_bytes"]["fp32"], 4)
        if opts["measure_latency"] and calibration:
            timed = {"fp32": src, "int8": dst}
            if excluded != user_excluded:
                timed["int8_unguarded"] = unguarded
            lat = latency_ms(timed, timing_feed(calibration))
            details["latency_ms"] = {k: round(v, 3) for k, v in lat.items()}
            details["latency_ms"]["ratio"] = round(lat["int8"] / lat["fp32"], 3)
            if "int8_unguarded" in lat:
                details["latency_ms"]["guard_cost"] = round(lat["int8"] / lat["int8_unguarded"], 3)
    finally:
        for f in work.glob("*"):
            f.unlink()
        work.rmdir()
    return VariantInfo(variant=NAME, tool=TOOL, tool_version=tool_version(), options=opts, details=details, warnings=tuple(warnings))


def _guard(
    src: Path,
    work: Path,
    opts: Mapping[str, Any],
    calibration: Sequence[Mapping[str, np.ndarray]],
    names: Sequence[str],
    user_excluded: Sequence[str],
    judge: Judge,
    details: dict[str, Any],
    unguarded: MetricReport,
) -> tuple[Path, list[str], MetricReport]:
    """Find the shortest prefix of the sensitivity ranking to keep in float (see the module docstring)."""
    free = [n for n in names if n not in user_excluded]
    ranking = _rank(src, work, opts, calibration, free, judge)
    details["ranking"] = [{"node": n, "error": (round(e, 6) if np.isfinite(e) else None)} for n, e in ranking]
    order = [n for n, _ in ranking]
    steps: list[dict[str, Any]] = []
    tried: dict[int, MetricReport] = {}

    def attempt(k: int) -> MetricReport:
        out = work / f"k{k}.onnx"
        _quantize(src, out, opts, calibration, list(user_excluded) + order[:k])
        rep = judge.metrics(out)
        tried[k] = rep
        steps.append({"excluded": k, "ok": rep.ok, "shortfall": round(rep.shortfall(), 4)})
        return rep

    # Grow 1, 2, 4, ... until a prefix passes, then bisect between the last failing and
    # the first passing size.  Every candidate excluded leaves nothing quantized: that is
    # no int8 model, so the search stops short of it.
    lo, hi = 0, None
    k = 1
    while k < len(order) and len(steps) < int(opts["max_steps"]):
        if attempt(k).ok:
            hi = k
            break
        lo = k
        k = min(2 * k, len(order) - 1) if k < len(order) - 1 else len(order)
    while hi is not None and hi - lo > 1 and len(steps) < int(opts["max_steps"]):
        mid = (lo + hi) // 2
        if attempt(mid).ok:
            hi = mid
        else:
            lo = mid
    details["search"] = steps
    if hi is None:
        if tried:
            best = min(tried, key=lambda kk: tried[kk].shortfall())
            details["closest"] = {"excluded": order[:best], "failures": tried[best].failures()}
        return work / "unguarded.onnx", list(user_excluded), unguarded
    return work / f"k{hi}.onnx", list(user_excluded) + order[:hi], tried[hi]
