"""onnxruntime adapter: an ``.onnx`` file in an ``InferenceSession`` on the CPU execution provider.

Session tuning, and why:

* ``graph_optimization_level="all"`` (default): parity is checked with the graph rewrites
  (constant folding, fusions) that a deployment gets by default, so the verdict covers
  what users actually run.  ``"disable"`` helps to tell an exporter bug from an
  optimiser one.
* ``intra_op_threads``: ``None`` keeps onnxruntime's default (one per physical core); set
  ``1`` on shared CI machines for predictable load.  ``inter_op_num_threads`` is 1 and the
  execution mode sequential: our graphs are chains, parallel branches buy nothing.
* Spinning of idle intra-op threads is off: parity runs are short bursts, and spinning
  threads only take CPU from whatever else runs on the machine.
* Weight prepacking (``prepacking``): ``None`` (default) turns it off for models whose
  weights are ONNX external data, on otherwise.  With it off, onnxruntime memory-maps the
  external data file and computes straight from it: the session opens at once instead of
  reading and repacking every weight (6 s for 2.5 GiB here), and holds the weights once
  (measured on a 2.5 GiB model: peak 2.52 GiB instead of 2.76 GiB), at some cost in speed
  of large matrix products.  Small models keep prepacking: it makes them faster.

:meth:`OnnxRuntime.session_options` returns these settings as a dict for the bundle manifest.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from exporter.deps import require
from exporter.errors import RunError, UsageError
from exporter.runtimes.base import IOSpec, Runtime, check_threads, onnx_path

__all__ = ["OnnxRuntime", "OPTIMIZATION_LEVELS", "ORT_DTYPES"]

#: Our names of onnxruntime's graph optimisation levels -> ``GraphOptimizationLevel`` members.
OPTIMIZATION_LEVELS: Mapping[str, str] = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

#: onnxruntime type strings -> numpy dtype names.
ORT_DTYPES: Mapping[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _ort() -> Any:
    # A core dependency, imported only when a session is made: importing this module stays cheap.
    return require("onnxruntime", "runtime 'onnxruntime'")


#: ``.onnx`` files larger than this hold their weights inline (protobuf caps a file at 2 GiB,
#: and exporters spill big weights to external data), so they are not parsed to look.
_INLINE_WEIGHTS_BYTES = 64 << 20


def _has_external_data(path: str) -> bool:
    """Whether any initializer of the model at ``path`` is stored as external data."""
    if os.path.getsize(path) > _INLINE_WEIGHTS_BYTES:
        return False
    try:
        import onnx

        model = onnx.load(path, load_external_data=False)
    except Exception:  # unreadable here: let onnxruntime report it when it loads the file
        return False
    graphs = [model.graph]
    while graphs:  # initializers of subgraphs (If / Loop bodies) count too
        g = graphs.pop()
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer):
            return True
        graphs += [a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
        graphs += [sg for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPHS for sg in a.graphs]
    return False


class OnnxRuntime(Runtime):
    """An ONNX model in onnxruntime on the CPU execution provider.

    Args:
        path: the ``.onnx`` file (external data is read from beside it).
        intra_op_threads: threads per operator; ``None`` = onnxruntime's default.
        graph_optimization_level: ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"``.
        prepacking: let onnxruntime prepack constant weights; ``None`` = only when the
            model's weights are not external data (see the module docstring).

    Raises:
        UsageError: missing file, unknown optimisation level, bad thread count, or inputs
            that are not numeric tensors.
        RunError: onnxruntime cannot load the file (its message is included); running a
            case that onnxruntime fails on raises it too.
    """

    name: ClassVar[str] = "onnxruntime"
    artifact_kind: ClassVar[str] = "onnx"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        intra_op_threads: int | None = None,
        graph_optimization_level: str = "all",
        prepacking: bool | None = None,
    ) -> None:
        self.path = onnx_path(path, self.name)
        self.source = self.path
        if graph_optimization_level not in OPTIMIZATION_LEVELS:
            raise UsageError(
                f"runtime 'onnxruntime': unknown graph_optimization_level {graph_optimization_level!r}; "
                f"use one of {', '.join(OPTIMIZATION_LEVELS)}"
            )
        check_threads(self.name, intra_op_threads)
        if prepacking is not None and not isinstance(prepacking, bool):
            raise UsageError(f"runtime 'onnxruntime': prepacking must be True, False or None (automatic), got {prepacking!r}")
        self.intra_op_threads = intra_op_threads
        self.graph_optimization_level = graph_optimization_level
        self.prepacking = (not _has_external_data(self.path)) if prepacking is None else prepacking
        ort = _ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[graph_optimization_level])
        so.intra_op_num_threads = intra_op_threads or 0  # 0 = onnxruntime's default
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # errors only; warnings about unused initializers are noise here
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not self.prepacking:
            so.add_session_config_entry("session.disable_prepacking", "1")
        self._providers = ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(self.path, sess_options=so, providers=self._providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise RunError(
                f"runtime 'onnxruntime': cannot load {self.path!r}: {type(e).__name__}: {e}; "
                "check that the file is a complete ONNX model (re-export it) and that its opset is supported "
                f"by onnxruntime {ort.__version__}"
            ) from e
        self._actual_providers = list(self._session.get_providers())
        problems = []
        inputs = []
        for i in self._session.get_inputs():
            dtype = ORT_DTYPES.get(i.type)
            if dtype is None:
                problems.append(f"input {i.name!r} has type {i.type}")
                continue
            shape = None if i.shape is None else tuple(d if isinstance(d, (int, str)) else None for d in i.shape)
            inputs.append(IOSpec(i.name, dtype, shape))
        if problems:
            raise UsageError(
                f"runtime 'onnxruntime': {self.path!r} has inputs exporter cannot feed ({'; '.join(problems)}); "
                "only numeric tensor inputs are supported"
            )
        self.inputs = tuple(inputs)
        self.outputs = tuple(o.name for o in self._session.get_outputs())

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        try:
            values = self._session.run(list(self.outputs), inputs)
        except Exception as e:  # onnxruntime's Fail/RuntimeException/...: e.g. a Reshape that baked in a size
            raise self.run_error(e) from e
        return dict(zip(self.outputs, values, strict=True))

    def session_options(self) -> dict[str, Any]:
        """The session settings, JSON-serialisable, for the bundle manifest."""
        ort = _ort()
        return {
            "onnxruntime_version": ort.__version__,
            "providers": list(self._actual_providers),
            "graph_optimization_level": self.graph_optimization_level,
            "intra_op_num_threads": self.intra_op_threads or 0,
            "inter_op_num_threads": 1,
            "execution_mode": "sequential",
            "allow_spinning": False,
            "prepacking": self.prepacking,
        }

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
