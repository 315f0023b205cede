"""OpenVINO adapter: an ``.onnx`` file compiled by Intel's OpenVINO on its CPU plugin.

OpenVINO reads ONNX directly (``Core.read_model``), so the bundle's ``model.onnx`` is what
runs; nothing is converted ahead of time.

**Defaults, on purpose.**  The model is compiled with OpenVINO's *own* defaults, because
that is what a deployment gets.  Some of them change numerics: on a CPU with bfloat16
instructions (AVX-512 BF16, AMX) the CPU plugin's default ``INFERENCE_PRECISION_HINT`` is
``bf16``, so a float32 model computes in bfloat16 and differs from its framework by about
1e-3 -- a float32 verdict then fails, as it should.  Every setting that changes numerics
(:data:`NUMERIC_SETTINGS`) is read back from the compiled model and recorded by
:meth:`OpenVinoRuntime.session_options`, and :meth:`OpenVinoRuntime.failure_hints` turns a
failure caused by a lowered precision into the fix: pin the setting with
``options={"INFERENCE_PRECISION_HINT": "f32"}`` (CLI: ``--runtime-option
INFERENCE_PRECISION_HINT=f32``).

Measured with OpenVINO 2026.4.1 on this project's CPU: the torch export of ``transformer``
computes wrong values (max_abs ~4) at seq=17 once the same compiled model has run seq=1,
and right ones when seq=17 comes first (onnxruntime, the reference evaluator and the flax
export are fine).  Either ``SNIPPETS_MODE=DISABLE`` (the CPU plugin's Snippets code
generator) or ``CPU_RUNTIME_CACHE_CAPACITY=0`` (its shape-keyed kernel cache) avoids it,
so a kernel generated for the size-1 dim is apparently reused for another size.  exporter
reports such a failure as it is (a deployment serving mixed lengths gets it too) and
applies no workaround by itself.

Options are OpenVINO property names with string values, passed to ``compile_model`` as
they are; OpenVINO validates them (an unknown name or value is a ``UsageError`` listing
the properties the device supports).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from exporter.deps import missing
from exporter.errors import RunError, UsageError
from exporter.runtimes.base import Runtime, check_threads, onnx_io, onnx_path

if TYPE_CHECKING:  # pragma: no cover
    from exporter.parity import OutputCheck

__all__ = ["OpenVinoRuntime", "NUMERIC_SETTINGS", "PIN_FLOAT32", "DEVICE"]

DEVICE = "CPU"

#: Properties of the CPU plugin that change what a model computes (not just how fast):
#: the precision of floating-point kernels, the accuracy/performance trade-off (ACCURACY
#: forces the model's own precision), dynamic quantisation of weights, KV-cache
#: compression (stateful models), denormal flushing, and the thread count (the order of
#: parallel reductions).
NUMERIC_SETTINGS: tuple[str, ...] = (
    "INFERENCE_PRECISION_HINT",
    "EXECUTION_MODE_HINT",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE",
    "KV_CACHE_PRECISION",
    "KEY_CACHE_PRECISION",
    "VALUE_CACHE_PRECISION",
    "CPU_DENORMALS_OPTIMIZATION",
    "INFERENCE_NUM_THREADS",
)

#: The options that make a float32 model compute in float32.
PIN_FLOAT32: Mapping[str, str] = {"INFERENCE_PRECISION_HINT": "f32"}

#: Mantissa bits of each floating type, by OpenVINO's and numpy's names (to tell an
#: inference precision below the precision of the model's outputs).
_MANTISSA_BITS: Mapping[str, int] = {
    "f64": 52, "float64": 52,
    "f32": 23, "float32": 23,
    "f16": 10, "float16": 10,
    "bf16": 7, "bfloat16": 7,
}  # fmt: skip


def _ov() -> Any:
    try:
        import openvino
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] != "openvino":
            raise
        raise missing("openvino", "runtime 'openvino'") from e
    return openvino


def _text(value: Any) -> str:
    """A property value as text: ``<Type: 'bfloat16'>`` -> ``bf16``, enums -> ``PERFORMANCE``."""
    type_name = getattr(value, "get_type_name", None)
    if callable(type_name):  # openvino.Type
        return str(type_name())
    name = getattr(value, "name", None)
    if isinstance(name, str):  # pybind11 enums (ExecutionMode.PERFORMANCE)
        return name
    return str(value)


def _check_options(options: Mapping[str, Any] | None) -> dict[str, str]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise UsageError(f"runtime 'openvino': options must be a mapping of property name -> value, got {type(options).__name__}")
    out: dict[str, str] = {}
    problems = []
    for key, value in options.items():
        if not isinstance(key, str) or not key:
            problems.append(f"option name {key!r} is not a non-empty string")
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            problems.append(f"option {key}={value!r}: the value must be a string or a number")
        else:
            out[key] = str(value)
    if problems:
        raise UsageError.listing("runtime 'openvino': bad options", problems)
    return out


class OpenVinoRuntime(Runtime):
    """An ONNX model compiled by OpenVINO for the CPU.

    Args:
        path: the ``.onnx`` file (external data is read from beside it).
        options: OpenVINO properties to pin (``{"INFERENCE_PRECISION_HINT": "f32"}``);
            everything else keeps OpenVINO's default.
        intra_op_threads: shorthand for ``INFERENCE_NUM_THREADS`` (``None``: OpenVINO's default).

    Raises:
        MissingDependencyError: the ``openvino`` package is not installed.
        UsageError: missing file, bad options (OpenVINO's message and the device's
            supported properties are included).
        RunError: OpenVINO cannot read or compile the model.
    """

    name: ClassVar[str] = "openvino"
    artifact_kind: ClassVar[str] = "onnx"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        options: Mapping[str, Any] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        self.path = onnx_path(path, self.name)
        self.source = self.path
        pinned = _check_options(options)
        if check_threads(self.name, intra_op_threads) is not None:
            pinned.setdefault("INFERENCE_NUM_THREADS", str(intra_op_threads))
        self.options: dict[str, str] = pinned
        ov = _ov()
        self.build = str(ov.__version__)  # "2026.4.1-22982-e213a147257-releases/2026/4"
        self.version = self.build.split("-", 1)[0]
        core = ov.Core()
        try:
            model = core.read_model(self.path)
        except RuntimeError as e:  # OpenVINO reports parse/conversion failures as RuntimeError
            raise RunError(
                f"runtime 'openvino': cannot load {self.path!r}: {_last_line(e)}; "
                f"check that it is a complete ONNX model whose operators OpenVINO {self.version} supports"
            ) from e
        import onnx

        # Declared inputs from the ONNX file itself (OpenVINO's ports drop the dim names).
        model_proto = onnx.load(self.path, load_external_data=False)
        self.inputs, self.outputs = onnx_io(model_proto)
        del model_proto
        self._core, self._model = core, model
        try:
            self._compile()
        except RuntimeError as e:
            if pinned and "property" in str(e).lower():  # OpenVINO validates names and values itself
                settable = sorted(k for k, mode in dict(core.get_property(DEVICE, "SUPPORTED_PROPERTIES")).items() if str(mode) == "RW")
                raise UsageError(
                    f"runtime 'openvino': bad option in {pinned}: {_last_line(e)}; the {DEVICE} plugin of OpenVINO "
                    f"{self.version} documents these settable properties: {', '.join(settable)}"
                ) from e
            raise RunError(f"runtime 'openvino': cannot load {self.path!r} (compiling for {DEVICE}): {_last_line(e)}") from e
        names = {n for port in self._compiled.outputs for n in port.get_names()}
        lost = [o for o in self.outputs if o not in names]
        assert not lost, f"OpenVINO renamed outputs {lost} of {self.path}"  # read_model keeps ONNX names
        # OpenVINO drops graph inputs that no output depends on; the model still declares them.
        self._fed = {n for port in self._compiled.inputs for n in port.get_names()}
        self._settings = self._read_settings()

    def _compile(self) -> None:
        self._compiled = self._core.compile_model(self._model, DEVICE, dict(self.options))
        self._request = self._compiled.create_infer_request()

    def _read_settings(self) -> dict[str, str]:
        settings = {}
        supported = set(dict(self._compiled.get_property("SUPPORTED_PROPERTIES")))
        for key in NUMERIC_SETTINGS:
            if key in supported:
                settings[key] = _text(self._compiled.get_property(key))
        return settings

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            self._request.infer({name: np.asarray(a, order="C") for name, a in inputs.items() if name in self._fed})
        except RuntimeError as e:
            # After a failed run the compiled model keeps the failed case's shapes and fails
            # the next case too, even on a new request (measured: OpenVINO 2026.4.1), so the
            # next case gets a freshly compiled model.
            self._compile()
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
            raise RunError(f"{self.describe()}: failed to run: {_last_line(e)} (inputs: {shapes})") from e
        # Copy: the request's output tensors are reused by the next infer().
        return {name: np.array(self._request.get_tensor(name).data, copy=True) for name in self.outputs}

    def session_options(self) -> dict[str, Any]:
        """What OpenVINO ran with, JSON-serialisable: the numerics-relevant settings as the
        compiled model reports them, and which of them were pinned by the caller."""
        return {
            "openvino_version": self.version,
            "openvino_build": self.build,
            "device": DEVICE,
            "settings": dict(self._settings),
            "pinned": dict(self.options),
            "defaults": sorted(k for k in self._settings if k not in self.options),
        }

    def failure_hints(self, failed: Sequence[OutputCheck]) -> list[str]:
        """Why these failing checks may be OpenVINO's settings rather than the export, and the fix.

        Returns one line when OpenVINO computed floating-point outputs at a lower precision
        than the outputs' own dtype (its default ``bf16`` for a float32 model), naming the
        setting and how to pin it; nothing otherwise.
        """
        precision = self._settings.get("INFERENCE_PRECISION_HINT", "")
        mode = self._settings.get("EXECUTION_MODE_HINT", "")
        have = _MANTISSA_BITS.get(precision)
        if have is None or mode == "ACCURACY":  # ACCURACY keeps the model's own precision
            return []
        lowered = sorted({c.dtype for c in failed if _MANTISSA_BITS.get(c.dtype, -1) > have})
        if not lowered:
            return []
        if precision == "f32":  # only float64 outputs are above it, and f32 is the CPU plugin's highest
            return [
                f"openvino's {DEVICE} plugin computes {'/'.join(lowered)} models in f32 at best (INFERENCE_PRECISION_HINT "
                "has no f64): results carry float32 rounding, and values beyond float32's range (3.4e38) do not survive; "
                "a looser tolerance (--atol/--rtol) covers only the rounding"
            ]
        origin = "set by you" if "INFERENCE_PRECISION_HINT" in self.options else f"OpenVINO {self.version}'s default on this CPU"
        return [
            f"openvino computed with INFERENCE_PRECISION_HINT={precision} ({origin}), below the "
            f"{'/'.join(lowered)} precision of the failing outputs; pin it with "
            "--runtime-option INFERENCE_PRECISION_HINT=f32 (Python: options={'INFERENCE_PRECISION_HINT': 'f32'})"
        ]

    def close(self) -> None:
        self._request = self._compiled = self._model = self._core = None


def _last_line(e: BaseException) -> str:
    """OpenVINO's message without its stack of ``Exception from src/...`` lines."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("Exception from ")]
    return " ".join(lines)[:600] or type(e).__name__
