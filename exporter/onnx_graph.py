"""An exported ONNX graph read as dataflow: producers, consumers, value types, module scopes.

What :mod:`exporter.explain` needs from a graph, and nothing else:

* :class:`GraphIndex`: nodes in file (= topological) order, who produces and who consumes
  each value, which values are graph inputs, initializers or constants, and each value's
  element type from ``onnx.shape_inference`` (run on a copy);
* :func:`torch_scopes`: the module path of each node of a torch export, from the metadata
  ``torch.onnx`` (dynamo) records (``pkg.torch.onnx.name_scopes``: the enclosing module
  paths, then the FX node name), or from the TorchScript exporter's ``/a/b/Op`` node names;
* :func:`cone`: the nodes between a set of already-checked values and one value;
* :func:`with_outputs`: a copy of the model that also returns given intermediate values
  (the bundle's file is never touched).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TORCH_SCOPES_KEY",
    "GraphIndex",
    "torch_scopes",
    "in_scope",
    "cone",
    "upstream",
    "with_outputs",
]

TORCH_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# torch.onnx puts nodes it creates outside any module (symbolic sizes) under this name.
_NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"
_CONSTANT_OPS = frozenset({"Constant", "ConstantOfShape"})


@dataclass(frozen=True)
class NodeInfo:
    """One node: its position in the graph, name (``#<index>`` when unnamed), op type, inputs, outputs."""

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class GraphIndex:
    """Dataflow of an ``onnx.ModelProto``'s main graph.

    Args:
        model: the model (weights need not be loaded: ``load_external_data=False`` is fine).
    """

    def __init__(self, model: Any) -> None:
        import onnx

        graph = model.graph
        self.nodes: list[NodeInfo] = [
            NodeInfo(i, n.name or f"#{i}", n.op_type, tuple(n.input), tuple(n.output)) for i, n in enumerate(graph.node)
        ]
        self.by_name: dict[str, NodeInfo] = {n.name: n for n in self.nodes}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for n in self.nodes:
            for v in n.outputs:
                if v:
                    self.producer[v] = n.index
            for v in n.inputs:
                if v:
                    self.consumers.setdefault(v, []).append(n.index)
        self.graph_inputs: tuple[str, ...] = tuple(i.name for i in graph.input)
        self.graph_outputs: tuple[str, ...] = tuple(o.name for o in graph.output)
        self.initializers: frozenset[str] = frozenset(t.name for t in graph.initializer) | frozenset(
            t.values.name for t in graph.sparse_initializer
        )
        self.constants: frozenset[str] = frozenset(
            v for n in self.nodes if n.op_type in _CONSTANT_OPS and not any(n.inputs) for v in n.outputs
        )
        self.elem_types: dict[str, int] = {}
        for vi in (*graph.input, *graph.output, *graph.value_info):
            self._record_type(vi)
        for t in graph.initializer:
            self.elem_types[t.name] = int(t.data_type)
        try:  # types of intermediate values; on a copy, the caller's model is not touched
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
        except Exception:  # a model onnx cannot infer (custom domains): values stay untyped
            inferred = None
        if inferred is not None:
            for vi in inferred.graph.value_info:
                self._record_type(vi)

    def _record_type(self, vi: Any) -> None:
        if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type:
            self.elem_types[vi.name] = int(vi.type.tensor_type.elem_type)

    def is_float(self, value: str) -> bool | None:
        """Whether ``value`` is a floating-point tensor; None when its type is unknown."""
        import onnx

        t = self.elem_types.get(value)
        if t is None:
            return None
        return t in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.DOUBLE,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.BFLOAT16,
        )

    def is_source(self, value: str) -> bool:
        """Graph inputs, initializers and constants: values no computation can get wrong."""
        return value in self.initializers or value in self.constants or value in self.graph_inputs or not value

    def leaving(self, members: set[int]) -> list[str]:
        """Values produced by ``members`` (node indices) that are used outside them or are
        graph outputs, in the order of their producers."""
        outs = set(self.graph_outputs)
        found = []
        for i in sorted(members):
            for v in self.nodes[i].outputs:
                if v and (v in outs or any(c not in members for c in self.consumers.get(v, ()))):
                    found.append(v)
        return found


def torch_scopes(model: Any) -> tuple[dict[str, str | None], str]:
    """The module path of every node of a torch export.

    Returns:
        ``({node name: module path, or None for nodes outside any module}, source)``;
        ``source`` says where the paths came from (``"torch.onnx name_scopes"``,
        ``"TorchScript node names"``) or is empty when the graph records none.
    """
    scopes: dict[str, str | None] = {}
    found = False
    for i, node in enumerate(model.graph.node):
        name = node.name or f"#{i}"
        props = {p.key: p.value for p in node.metadata_props}
        raw = props.get(TORCH_SCOPES_KEY)
        if raw is None:
            scopes[name] = None
            continue
        try:
            stack = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            scopes[name] = None
            continue
        if not isinstance(stack, (list, tuple)) or not stack or stack[0] == _NO_MODULE:
            scopes[name] = None
            continue
        found = True
        # [ "", "encoder.layer.0", "encoder.layer.0.attention", ..., "<fx node name>" ]
        scopes[name] = str(stack[-2]) if len(stack) >= 2 else ""
    if found:
        return scopes, "torch.onnx name_scopes"
    names = [n.name for n in model.graph.node]
    if names and all(n.startswith("/") for n in names if n):
        return {n: ".".join(n.split("/")[1:-1]) for n in names}, "TorchScript node names"
    return {n.name or f"#{i}": None for i, n in enumerate(model.graph.node)}, ""


def in_scope(path: str | None, module: str, sep: str) -> bool:
    """Whether a node whose scope is ``path`` belongs to ``module`` (itself or a submodule)."""
    if module == "":
        return True
    return path is not None and (path == module or path.startswith(module + sep))


def cone(index: GraphIndex, value: str, stop: Iterable[str]) -> tuple[list[int], list[str]]:
    """The nodes that compute ``value`` from the values in ``stop`` (and sources).

    Walks producers backwards from ``value`` and stops at values in ``stop``, graph
    inputs, initializers and constants.

    Returns:
        ``(node indices in graph order, the values of stop/graph inputs it reached)``.
    """
    stops = set(stop)
    members: set[int] = set()
    boundary: list[str] = []
    seen: set[str] = set()
    pending = [value]
    first = True
    while pending:
        v = pending.pop()
        if v in seen:
            continue
        seen.add(v)
        if not first and (v in stops or index.is_source(v)):
            if v in stops or v in index.graph_inputs:
                boundary.append(v)
            continue
        first = False
        p = index.producer.get(v)
        if p is None:
            continue
        if p not in members:
            members.add(p)
            pending.extend(u for u in index.nodes[p].inputs if u)
    return sorted(members), sorted(set(boundary), key=lambda v: index.producer.get(v, -1))


def upstream(index: GraphIndex, value: str) -> set[str]:
    """Every value ``value`` depends on (itself excluded)."""
    seen: set[str] = set()
    pending = [value]
    while pending:
        p = index.producer.get(pending.pop())
        if p is None:
            continue
        for u in index.nodes[p].inputs:
            if u and u not in seen:
                seen.add(u)
                pending.append(u)
    return seen


def with_outputs(model: Any, values: Sequence[str], index: GraphIndex) -> Any:
    """A copy of ``model`` whose graph also outputs ``values`` (typed from ``index``).

    Values that are already graph outputs, graph inputs or untyped are left out.
    """
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = set(index.graph_outputs) | set(index.graph_inputs)
    for v in dict.fromkeys(values):
        if v in have or v not in index.elem_types:
            continue
        copy.graph.output.append(onnx.helper.make_tensor_value_info(v, index.elem_types[v], None))
    return copy
