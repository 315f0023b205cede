"""``fp16``: float16 weights and compute, float32 kept where it must be.

``onnxruntime.transformers.float16.convert_float_to_float16`` does the conversion
(``keep_io_types=True`` by default: the model still takes and returns float32).  The
fp32 block list is found automatically:

1. *overflow*: the fp16 model runs on the calibration inputs with every intermediate
   tensor exposed; a node whose fp16 output is non-finite where the float32 model's is
   finite, while its own inputs are finite, is where the overflow starts: it goes on
   ``node_block_list`` and the model is converted again, until every output is finite
   (or ``max_rounds`` is reached);
2. *lost precision*: when a judge is given and the task metrics miss their thresholds,
   op types known to lose precision in fp16 (:data:`SENSITIVE_OPS`: normalisations,
   reductions, exp/pow) go on ``op_block_list`` one at a time, in that order, until the
   metrics pass or the list is exhausted.

The block lists are recorded.  onnxruntime's CPU provider runs fp16 graphs (with casts
where it lacks fp16 kernels): the verdict holds there; the speed gain is a GPU's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter import deps
from exporter.errors import ExportError, RunError
from exporter.models.registry import Tolerance
from exporter.variants.base import Judge, VariantInfo, check_options, latency_ms, model_bytes, timing_feed, tool_version

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec

__all__ = [
    "NAME", "TOOL", "DEFAULT_OPTIONS", "TOLERANCES", "ELEMENTWISE_DECIDES", "SENSITIVE_OPS",
    "applies", "transform", "overflow_origins", "collapse_round_trips", "topological_sort",
]  # fmt: skip

NAME = "fp16"
TOOL = "onnxruntime.transformers.float16"
DEFAULT_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {"keep_io_types": True, "op_block_list": (), "node_block_list": (), "max_rounds": 8, "measure_latency": True}
)
#: float32 outputs of an fp16 graph: float16 has 11 significant bits (eps 9.8e-4) and
#: errors accumulate over layers.  Measured on the real all-MiniLM-L6-v2, batch up to 64 x
#: seq 64: last_hidden_state max_abs 3.4e-3 (|ref| up to ~10), sentence_embedding 3e-4.
TOLERANCES: Mapping[str, Tolerance] = MappingProxyType({"float32": Tolerance(1e-2, 1e-2)})
ELEMENTWISE_DECIDES = True
#: Op types that lose precision in fp16 (long reductions, exponentials), blocked in this
#: order when the metrics miss their thresholds.
SENSITIVE_OPS: tuple[str, ...] = (
    "LayerNormalization",
    "ReduceMean",
    "ReduceSum",
    "Softmax",
    "Pow",
    "Sqrt",
    "Exp",
    "Erf",
    "Gelu",
    "Div",
    "BatchNormalization",
)


def applies(spec: ModelSpec | None, model: Any) -> str | None:
    """None when the graph computes in float32 (something to convert), else the reason."""
    from onnx import TensorProto

    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    io = [v for v in list(model.graph.input) + list(model.graph.output) if v.type.tensor_type.elem_type == TensorProto.FLOAT]
    if not floats and not io:
        return "the model has no float32 weights or float32 inputs/outputs: nothing to convert to float16"
    return None


def _convert(model: Any, opts: Mapping[str, Any], op_block: list[str], node_block: list[str]) -> Any:
    float16 = deps.require("onnxruntime.transformers.float16", "the fp16 variant")
    ops = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(op_block))
    try:
        converted = float16.convert_float_to_float16(
            model, keep_io_types=bool(opts["keep_io_types"]), op_block_list=ops, node_block_list=list(node_block)
        )
    except Exception as e:  # the converter's own failures
        raise ExportError(f"variant 'fp16': float16 conversion failed: {type(e).__name__}: {e}") from e
    collapse_round_trips(converted)
    topological_sort(converted)
    return converted


def topological_sort(model: Any) -> None:
    """Put the graph's nodes in topological order, in place (stable for nodes already in order).

    The ONNX standard requires it; the converter appends its Casts at the end of the node
    list (onnxruntime sorts on load, the reference evaluator does not).
    """
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle or an input from an outer scope: keep the rest as is
            ordered += rest
            break
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def collapse_round_trips(model: Any) -> int:
    """Replace ``Cast(to=float16) -> Cast(to=float)`` chains on float32 values by ``Identity``, in place.

    The converter puts such a round trip between two float32 (blocked) nodes and before a
    kept float32 output: the value is rounded to fp16 on the way, which overflows exactly
    where blocking was meant to prevent it.  Returns the number of chains collapsed.
    """
    from onnx import TensorProto, helper

    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    producer = {o: n for n in model.graph.node for o in n.output}

    def cast_to(n: Any) -> int | None:
        return next((int(a.i) for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    count = 0
    for i, n in enumerate(model.graph.node):
        first = producer.get(n.input[0]) if n.input else None
        if cast_to(n) != TensorProto.FLOAT or first is None or cast_to(first) != TensorProto.FLOAT16:
            continue
        if types.get(first.input[0]) != TensorProto.FLOAT:
            continue
        model.graph.node[i].CopyFrom(helper.make_node("Identity", [first.input[0]], list(n.output), name=n.name))
        count += 1
    if count:  # drop Casts whose outputs nobody reads any more
        used = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
        keep = [n for n in model.graph.node if n.op_type != "Cast" or any(o in used for o in n.output)]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return count


def _all_outputs(model: Any) -> tuple[Any, list[str]]:
    """A copy of ``model`` whose graph outputs include every typed intermediate tensor."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:  # shape inference is best effort: keep the value_info we have
        pass
    have = {o.name for o in m.graph.output}
    typed = {v.name: v for v in m.graph.value_info}
    names = []
    for n in m.graph.node:
        for o in n.output:
            if o and o not in have and o in typed and typed[o].type.tensor_type.elem_type:
                m.graph.output.append(typed[o])
                have.add(o)
                names.append(o)
    return m, names


def _runner(model: Any) -> Any:
    """``feed -> {output: value}`` for ``model`` in onnxruntime with graph optimisations off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return lambda f: dict(zip(names, sess.run(names, {k: v for k, v in f.items() if k in wanted})))


def _run_all(model: Any, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    run = _runner(model)
    return [run(f) for f in feeds]


def _nonfinite(x: Any) -> np.ndarray | None:
    a = np.asarray(x)
    if a.dtype.kind != "f":
        return None
    return ~np.isfinite(a)


def overflow_origins(fp32: Any, fp16: Any, feeds: list[dict[str, np.ndarray]]) -> list[str]:
    """Names of the fp16 model's nodes where non-finite values start (see the module docstring)."""
    m32, _ = _all_outputs(fp32)
    m16, _ = _all_outputs(fp16)
    bad: set[str] = set()  # tensors non-finite in fp16 where fp32 is finite
    try:
        run32, run16 = _runner(m32), _runner(m16)
    except Exception as e:  # onnxruntime cannot load the instrumented copy
        raise RunError(f"variant 'fp16': could not run the models to locate overflows: {type(e).__name__}: {e}") from e
    for feed in feeds:  # one case at a time: every intermediate tensor of a big case is a lot of memory
        try:
            a, b = run32(feed), run16(feed)
        except Exception as e:  # onnxruntime's own failure types
            raise RunError(f"variant 'fp16': could not run the models to locate overflows: {type(e).__name__}: {e}") from e
        for name, v16 in b.items():
            nf16 = _nonfinite(v16)
            if nf16 is None or not nf16.any():
                continue
            v32 = a.get(name)
            nf32 = _nonfinite(v32) if v32 is not None and np.shape(v32) == np.shape(v16) else None
            if nf32 is None or (nf16 & ~nf32).any():
                bad.add(name)
    known = {n.name for n in fp32.graph.node}
    consumers: dict[str, list[str]] = {}
    for n in fp16.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    origins: list[str] = []
    for n in fp16.graph.node:
        if not (any(o in bad for o in n.output) and not any(i in bad for i in n.input)):
            continue
        if n.name in known:
            origins.append(n.name)
        else:
            # A Cast the converter inserted after a blocked node: the value overflows on its
            # way back to fp16, so the nodes that read it must compute in float32 too.
            origins += [c for o in n.output for c in consumers.get(o, []) if c in known]
    return list(dict.fromkeys(origins))


def _outputs_finite(fp32: Any, fp16: Any, feeds: list[dict[str, np.ndarray]]) -> bool:
    """Whether the fp16 model's graph outputs are finite wherever the float32 model's are."""
    try:
        r32, r16 = _run_all(fp32, feeds), _run_all(fp16, feeds)
    except Exception as e:  # onnxruntime's own failure types
        raise RunError(f"variant 'fp16': could not run the converted model: {type(e).__name__}: {e}") from e
    for a, b in zip(r32, r16):
        for name, v16 in b.items():
            nf16, nf32 = _nonfinite(v16), _nonfinite(a.get(name))
            if nf16 is not None and nf16.any() and (nf32 is None or (nf16 & ~nf32).any()):
                return False
    return True


def transform(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    calibration: list[dict[str, np.ndarray]],
    options: Mapping[str, Any] | None = None,
    judge: Judge | None = None,
) -> VariantInfo:
    """Convert ``src`` to float16 at ``dst``, finding the fp32 block list automatically.

    Args:
        src: the float32 ``model.onnx``.
        dst: where to write the fp16 model.
        calibration: inputs on which overflow is looked for (the sweep's).
        options: see :data:`DEFAULT_OPTIONS` (user block lists are kept and extended).
        judge: scores against the framework; when given, precision loss extends the block list.

    Returns:
        The :class:`VariantInfo`; details hold ``op_block_list``, ``node_block_list``,
        the rounds taken, whether outputs are finite, bytes and latencies.

    Raises:
        UsageError: bad options.  ExportError: the converter failed.
        RunError: onnxruntime cannot run the converted model.
    """
    import onnx

    opts = check_options(NAME, DEFAULT_OPTIONS, options)
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fp32 = onnx.load(str(src))
    op_block = list(opts["op_block_list"])
    node_block = list(opts["node_block_list"])
    warnings: list[str] = []
    rounds: list[dict[str, Any]] = []
    for _ in range(int(opts["max_rounds"])):
        fp16 = _convert(fp32, opts, op_block, node_block)
        origins = [n for n in overflow_origins(fp32, fp16, calibration) if n not in node_block]
        rounds.append({"overflow_nodes": origins})
        if not origins:
            break
        node_block += origins
    else:
        fp16 = _convert(fp32, opts, op_block, node_block)
    finite = _outputs_finite(fp32, fp16, calibration)
    if not finite:
        warnings.append(f"fp16 outputs still overflow after {len(rounds)} rounds of blocking nodes (blocked: {', '.join(node_block)})")
    onnx.save(fp16, str(dst))
    report = None
    if judge is not None:
        report = judge.metrics(dst)
        for op in SENSITIVE_OPS:
            if report.ok:
                break
            if op in op_block or not any(n.op_type == op for n in fp32.graph.node):
                continue
            op_block.append(op)
            onnx.save(_convert(fp32, opts, op_block, node_block), str(dst))
            report = judge.metrics(dst)
            rounds.append({"blocked_op": op, "metrics_ok": report.ok, "failures": report.failures()})
        if not report.ok:
            warnings.append("fp16 misses its task-metric thresholds even with every sensitive op type kept in float32: " + "; ".join(report.failures()))
    details: dict[str, Any] = {
        "op_block_list": sorted(set(op_block)),
        "node_block_list": node_block,
        "rounds": rounds,
        "finite": finite,
        "model_bytes": {"fp32": model_bytes(src), "fp16": model_bytes(dst)},
    }
    if report is not None:
        details["metrics_ok"] = report.ok
    if opts["measure_latency"] and calibration:
        lat = latency_ms({"fp32": src, "fp16": dst}, timing_feed(calibration))
        details["latency_ms"] = {k: round(v, 3) for k, v in lat.items()}
        details["latency_ms"].update(ratio=round(lat["fp16"] / lat["fp32"], 3), provider="CPUExecutionProvider")
    return VariantInfo(variant=NAME, tool=TOOL, tool_version=tool_version(), options=opts, details=details, warnings=tuple(warnings))
