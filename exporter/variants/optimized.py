"""``optimized``: an offline-optimized graph for onnxruntime.

* Transformer graphs (a MatMul -> Softmax -> MatMul attention block is present):
  ``onnxruntime.transformers.optimizer.optimize_model`` (model type ``bert``;
  ``num_heads`` / ``hidden_size`` from the options, else detected from the graph by the
  optimizer), fusion counts from ``get_fused_operator_statistics()``.  When the graph has
  attention blocks but nothing fused into ``Attention`` / ``MultiHeadAttention``, the
  result says so in a warning (measured on our MiniLM torch export: 12
  SkipLayerNormalization + 6 BiasGelu, 0 Attention).
* Anything else: onnxruntime's own offline graph optimisation
  (``SessionOptions.optimized_model_filepath``) at ``ORT_ENABLE_EXTENDED`` on the CPU
  provider (``all`` adds layout transforms tied to the machine that wrote the file).

Both may emit contrib operators (``com.microsoft`` domain: SkipLayerNormalization,
FusedMatMul, ...), which only onnxruntime runs.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from exporter import deps
from exporter.errors import ExportError, UsageError
from exporter.variants.base import Judge, VariantInfo, check_options, latency_ms, model_bytes, timing_feed, tool_version

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from exporter.models.registry import ModelSpec, Tolerance

__all__ = ["NAME", "TOOL", "DEFAULT_OPTIONS", "TOLERANCES", "ELEMENTWISE_DECIDES", "applies", "transform", "attention_blocks"]

NAME = "optimized"
TOOL = "onnxruntime.transformers.optimizer / onnxruntime graph optimizer"
#: ``model_type``: "auto" (bert when the graph has attention, else generic), "bert" or
#: "generic"; ``num_heads`` / ``hidden_size``: 0 = let the optimizer detect them;
#: ``level``: the generic path's onnxruntime level ("basic", "extended", "all").
DEFAULT_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {"model_type": "auto", "num_heads": 0, "hidden_size": 0, "level": "extended", "measure_latency": True}
)
#: The optimizer must not change the numbers: the model's own float32 tolerances apply.
TOLERANCES: Mapping[str, Tolerance] = MappingProxyType({})
ELEMENTWISE_DECIDES = True

_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention")


def attention_blocks(model: Any) -> int:
    """Softmax nodes fed (possibly through Where/Add/Mul/Div) by a MatMul and feeding a MatMul.

    This is the shape of scaled dot-product attention in an exported graph; the count is
    what an attention fusion should replace.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    passthrough = {"Where", "Add", "Mul", "Div", "Cast", "Sub"}
    count = 0
    for n in model.graph.node:
        if n.op_type != "Softmax":
            continue
        frontier, seen, fed_by_matmul = list(n.input[:1]), set(), False
        while frontier and not fed_by_matmul:
            t = frontier.pop()
            p = producers.get(t)
            if p is None or p.name in seen:
                continue
            seen.add(p.name)
            if p.op_type == "MatMul":
                fed_by_matmul = True
            elif p.op_type in passthrough:
                frontier += list(p.input)
        feeds_matmul = any(c.op_type == "MatMul" for c in consumers.get(n.output[0], []))
        count += int(fed_by_matmul and feeds_matmul)
    return count


def applies(spec: ModelSpec | None, model: Any) -> str | None:
    """Every ONNX graph can be optimized; nothing to skip."""
    return None


def _generic(src: Path, dst: Path, level: str) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own failure types
        raise ExportError(f"variant 'optimized': onnxruntime could not optimize {src}: {type(e).__name__}: {e}") from e


def transform(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    calibration: list[dict[str, np.ndarray]] | None = None,
    options: Mapping[str, Any] | None = None,
    judge: Judge | None = None,
) -> VariantInfo:
    """Write the optimized graph of ``src`` to ``dst``.

    Args:
        src: the float32 ``model.onnx``.
        dst: where to write the optimized model.
        calibration: inputs; the median-sized one times plain vs optimized.
        options: see :data:`DEFAULT_OPTIONS`.
        judge: unused (the elementwise check of the bundle judges this variant).

    Returns:
        The :class:`VariantInfo`: path taken, fusion counts, attention blocks found,
        operator counts before/after, bytes, latencies; a warning when attention was not
        fused or the result is slower than the plain model.

    Raises:
        UsageError: bad options.
        ExportError: the optimizer failed.
    """
    import onnx

    opts = check_options(NAME, DEFAULT_OPTIONS, options)
    if opts["model_type"] not in ("auto", "bert", "generic"):
        raise UsageError(f"variant 'optimized': model_type must be auto, bert or generic, got {opts['model_type']!r}")
    if opts["level"] not in _LEVELS:
        raise UsageError(f"variant 'optimized': level must be one of {', '.join(_LEVELS)}, got {opts['level']!r}")
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    blocks = attention_blocks(model)
    path = opts["model_type"] if opts["model_type"] != "auto" else ("bert" if blocks else "generic")
    before = Counter(n.op_type for n in model.graph.node)
    warnings: list[str] = []
    details: dict[str, Any] = {"path": path, "attention_blocks": blocks}
    if path == "bert":
        optimizer = deps.require("onnxruntime.transformers.optimizer", "the optimized variant")
        try:
            opt = optimizer.optimize_model(
                model, model_type="bert", num_heads=int(opts["num_heads"]), hidden_size=int(opts["hidden_size"]), opt_level=0
            )
        except Exception as e:  # the optimizer's own failures on a graph it does not expect
            raise ExportError(f"variant 'optimized': the transformer optimizer failed on {src}: {type(e).__name__}: {e}") from e
        fused = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        details["fusions"] = fused
        opt.save_model_to_file(str(dst))
        n_attention = sum(fused.get(op, 0) for op in _ATTENTION_OPS)
        if blocks and n_attention == 0:
            warnings.append(
                f"the graph has {blocks} attention block(s) (MatMul -> Softmax -> MatMul) but the transformer optimizer "
                "fused 0 Attention: its pattern matcher did not recognise them, so attention runs unfused; the gain "
                f"comes only from the other fusions ({', '.join(f'{v} {k}' for k, v in sorted(fused.items())) or 'none'})"
            )
    else:
        _generic(src, dst, opts["level"])
    after = Counter(n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node)
    details["ops_before"] = dict(sorted(before.items()))
    details["ops_after"] = dict(sorted(after.items()))
    if path == "generic":
        details["fusions"] = {op: n for op, n in sorted(after.items()) if op not in before}
    details["model_bytes"] = {"fp32": model_bytes(src), "optimized": model_bytes(dst)}
    if opts["measure_latency"] and calibration:
        lat = latency_ms({"fp32": src, "optimized": dst}, timing_feed(calibration))
        details["latency_ms"] = {k: round(v, 3) for k, v in lat.items()}
        details["latency_ms"]["ratio"] = round(lat["optimized"] / lat["fp32"], 3)
        # Timing noise on a shared machine is a few percent; flag only a clear loss.
        if lat["optimized"] > lat["fp32"] * 1.10:
            warnings.append(
                f"the optimized model is slower than the plain export ({lat['optimized']:.3g} ms vs {lat['fp32']:.3g} ms, "
                "interleaved runs of a median-sized case)"
            )
    return VariantInfo(variant=NAME, tool=TOOL, tool_version=tool_version(), options=opts, details=details, warnings=tuple(warnings))
