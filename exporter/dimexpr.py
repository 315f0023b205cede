"""Derived dynamic dims: a dim given as a sum of other dims (``"past + seq"``).

A registry input shape holds ints (static), names (dynamic dims: ``"batch"``) and, for
inputs whose size is tied to others, expressions of names and ints joined by ``+``/``-``:
a decoder's ``attention_mask`` is ``("batch", "past + seq")`` because it covers the cached
positions and the new ones.  Such a dim is not an independent input of the sweep: its size
follows from the named dims (:func:`evaluate`).

The exporters treat it differently, so the one place that knows how is here:

* ``torch.export`` cannot declare a dim as a sum of two independent ``Dim`` objects;
  :func:`torch_dynamic_shapes` gives a derived axis ``Dim.AUTO`` and torch infers the
  relation from the model (it then names the axis ``s<N>`` in the ONNX graph, so
  :func:`name_onnx_dims` writes the expression back as the axis' ``dim_param``);
* ``jax.export.symbolic_shape`` parses ``"batch, past + seq"`` itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from exporter.errors import UsageError

__all__ = ["is_derived", "terms", "names_in", "evaluate", "root_dims", "torch_dynamic_shapes", "name_onnx_dims"]

_TOKEN = re.compile(r"\s*([+-])?\s*([A-Za-z_][A-Za-z0-9_]*|\d+)\s*")


def is_derived(dim: object) -> bool:
    """True for an expression dim (``"past + seq"``), False for a name (``"batch"``) or an int."""
    return isinstance(dim, str) and not dim.isidentifier()


def terms(expr: str) -> list[tuple[int, str | int]]:
    """``"past + seq - 1"`` -> ``[(1, "past"), (1, "seq"), (-1, 1)]``.

    Raises:
        UsageError: not a sum of names and non-negative ints.
    """
    out: list[tuple[int, str | int]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos or (m.group(1) is None and out):
            raise UsageError(f"dim expression {expr!r} is not a sum of dim names and ints such as 'past + seq'")
        sign = -1 if m.group(1) == "-" else 1
        tok = m.group(2)
        out.append((sign, int(tok) if tok.isdigit() else tok))
        pos = m.end()
    if not out:
        raise UsageError(f"dim expression {expr!r} is empty")
    return out


def names_in(dim: object) -> list[str]:
    """The dim names ``dim`` uses: itself for a name, those of an expression, none for an int."""
    if not isinstance(dim, str):
        return []
    if not is_derived(dim):
        return [dim]
    return [t for _s, t in terms(dim) if isinstance(t, str)]


def evaluate(dim: int | str, sizes: Mapping[str, int]) -> int:
    """The size of ``dim`` given the named dims' ``sizes``.

    Raises:
        UsageError: a name without a size.
    """
    if isinstance(dim, int):
        return dim
    if not is_derived(dim):
        if dim not in sizes:
            raise UsageError(f"no size given for dynamic dim {dim!r} (have {sorted(sizes)})")
        return int(sizes[dim])
    total = 0
    for sign, t in terms(dim):
        if isinstance(t, int):
            total += sign * t
        elif t in sizes:
            total += sign * int(sizes[t])
        else:
            raise UsageError(f"no size given for dynamic dim {t!r} of {dim!r} (have {sorted(sizes)})")
    return total


def root_dims(shapes: Iterable[Sequence[int | str]]) -> list[str]:
    """The independent dynamic dims of some shapes, in order of first use (expressions contribute their names)."""
    seen: list[str] = []
    for shape in shapes:
        for d in shape:
            for n in names_in(d):
                if n not in seen:
                    seen.append(n)
    return seen


def torch_dynamic_shapes(shapes: Sequence[Sequence[int | str]], torch: Any) -> tuple[dict[int, Any] | None, ...]:
    """``dynamic_shapes`` for ``torch.export``/``torch.onnx.export(dynamo=True)``, one entry per input.

    A named dim becomes one shared ``torch.export.Dim(name)``; a derived dim
    ``Dim.AUTO`` (torch infers its relation to the named ones from the model's code).
    """
    objs = {n: torch.export.Dim(n) for n in root_dims(shapes)}
    out: list[dict[int, Any] | None] = []
    for shape in shapes:
        axes = {}
        for i, d in enumerate(shape):
            if isinstance(d, str):
                axes[i] = torch.export.Dim.AUTO if is_derived(d) else objs[d]
        out.append(axes or None)
    return tuple(out)


def name_onnx_dims(graph: Any, shapes: Mapping[str, Sequence[int | str]]) -> None:
    """Name an ``onnx_ir`` graph's derived input dims after the spec's expressions.

    torch calls a ``Dim.AUTO`` axis ``s53``, jax2onnx writes ``seq + past``; both become the
    spec's ``past + seq``.  Only axes the spec declares derived *and* the exporter left
    symbolic are renamed: a dim the exporter fixed to a number stays a number (that is an
    export problem the caller reports).

    Args:
        graph: ``onnx_ir.Graph`` (changed in place).
        shapes: input name -> the spec's shape.
    """
    import onnx_ir as ir

    for v in graph.inputs:
        want = shapes.get(v.name)
        if want is None or v.shape is None or len(v.shape) != len(want):
            continue
        if not any(is_derived(w) and not isinstance(d, int) for d, w in zip(v.shape, want)):
            continue
        dims = [ir.SymbolicDim(w) if is_derived(w) and not isinstance(d, int) else d for d, w in zip(v.shape, want)]
        v.shape = ir.Shape(dims)
