"""Reference adapter: ``onnx.reference.ReferenceEvaluator``, the ONNX specification in numpy.

Slow, but independent of onnxruntime's kernels and graph optimisations: when onnxruntime
and the framework disagree, agreement of this runtime with one of them says which side
is wrong.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from exporter.errors import UsageError
from exporter.runtimes.base import Runtime, onnx_io, onnx_path

__all__ = ["ReferenceRuntime"]


class ReferenceRuntime(Runtime):
    """An ONNX model in ``onnx.reference.ReferenceEvaluator``.

    Args:
        path: the ``.onnx`` file (external data is read from beside it).

    Raises:
        UsageError: missing file, or a file that onnx cannot load or evaluate.
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
            self._evaluator = ReferenceEvaluator(model)
            self.inputs, self.outputs = onnx_io(model)
        except Exception as e:  # protobuf DecodeError, missing external data, unsupported op...
            raise UsageError(
                f"runtime 'reference': cannot load {self.path!r}: {type(e).__name__}: {e}; "
                f"check that the file is a complete ONNX model that onnx {onnx.__version__} supports"
            ) from e

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        values = self._evaluator.run(list(self.outputs), inputs)
        return dict(zip(self.outputs, values, strict=True))

    def close(self) -> None:
        self._evaluator = None
