"""Reference adapter: ``onnx.reference.ReferenceEvaluator``, the ONNX specification in numpy.

Slow, but independent of onnxruntime's kernels and graph optimisations: when onnxruntime
and the framework disagree, agreement of this runtime with one of them says which side
is wrong.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from exporter.errors import RunError
from exporter.runtimes.base import Runtime, onnx_io, onnx_path

__all__ = ["ReferenceRuntime"]


_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def _nonstandard_ops(model: Any) -> dict[str, int]:
    """``{"com.microsoft.SkipLayerNormalization": 12, ...}``: operators of the main graph
    whose domain is not the ONNX standard's (and not a local function of the model)."""
    local = {(f.domain, f.name) for f in model.functions}
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain not in _STANDARD_DOMAINS and (n.domain, n.op_type) not in local:
            key = f"{n.domain}.{n.op_type}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


class ReferenceRuntime(Runtime):
    """An ONNX model in ``onnx.reference.ReferenceEvaluator``.

    Args:
        path: the ``.onnx`` file (external data is read from beside it).

    Raises:
        UsageError: missing file, or inputs that are not numeric tensors.
        RunError: a file that onnx cannot load or the evaluator cannot take; running a case
            that the evaluator fails on raises it too.
    """

    name: ClassVar[str] = "reference"
    artifact_kind: ClassVar[str] = "onnx"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        self.path = onnx_path(path, self.name)
        self.source = self.path
        try:
            model = onnx.load(self.path)
        except Exception as e:  # protobuf DecodeError, missing external data...
            raise RunError(
                f"runtime 'reference': cannot load {self.path!r}: {type(e).__name__}: {e}; "
                f"check that the file is a complete ONNX model that onnx {onnx.__version__} supports"
            ) from e
        contrib = _nonstandard_ops(model)
        if contrib:  # e.g. an `optimized` variant's fused SkipLayerNormalization / FusedMatMul
            raise RunError.listing(
                f"runtime 'reference' cannot run {self.path!r}: it uses operators outside the ONNX standard "
                "(onnxruntime contrib operators, e.g. from an optimized variant); verify it with --runtime onnxruntime",
                [f"operator {op} ({n} node{'s' if n > 1 else ''})" for op, n in contrib.items()],
            )
        try:
            self._evaluator = ReferenceEvaluator(model)
        except Exception as e:  # an operator or attribute the evaluator does not implement
            raise RunError(
                f"runtime 'reference': cannot load {self.path!r}: {type(e).__name__}: {e}; "
                f"check that the file is a complete ONNX model that onnx {onnx.__version__} supports"
            ) from e
        self.inputs, self.outputs = onnx_io(model, self.path)

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        try:
            values = self._evaluator.run(list(self.outputs), inputs)
        except Exception as e:  # an op the evaluator cannot run on these inputs
            raise self.run_error(e) from e
        return dict(zip(self.outputs, values, strict=True))

    def close(self) -> None:
        self._evaluator = None
