"""The one runtime interface: load an artifact, ``run(dict[str, np.ndarray]) -> dict[str, np.ndarray]``.

Every adapter (torch, jax, onnxruntime, reference, node) subclasses :class:`Runtime`,
declares its inputs (:class:`IOSpec`) and output names, and implements ``_run``.  The
checks of what a caller passes in (names, dtypes, ranks, static dims, named dims that must
agree across inputs) live here, once, so adapters cannot drift apart; so does the naming of
what a framework build returns (:func:`name_outputs`).

Errors an adapter raises: ``UsageError`` for bad arguments (a path that is not a file,
inputs that do not fit, a build that returns other outputs than its spec declares) and
``RunError`` (:meth:`Runtime.run_error`) when the runtime itself cannot load the model or
run a case.  Anything else escaping an adapter is a bug and propagates.

Adapters import their framework inside their own module, and this module imports none of
them: ``import exporter.runtimes.base`` stays cheap.  :func:`load_runtime` imports an adapter by
name from :data:`RUNTIMES`.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from exporter.errors import MissingDependencyError, RunError, UsageError
from exporter.testdata import value_dims

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec, TensorSpec
    from exporter.parity import OutputCheck

__all__ = [
    "IOSpec",
    "Runtime",
    "RUNTIMES",
    "ALIASES",
    "check_arrays",
    "check_threads",
    "load_runtime",
    "runtime_class",
    "spec_io",
    "name_outputs",
    "onnx_path",
    "onnx_io",
]

#: Runtime name -> ``"module:Class"``.  Adapters are imported only when asked for.
RUNTIMES: Mapping[str, str] = MappingProxyType(
    {
        "torch": "exporter.runtimes.torch:TorchRuntime",
        "jax": "exporter.runtimes.jax:JaxRuntime",
        "onnxruntime": "exporter.runtimes.onnxruntime:OnnxRuntime",
        "reference": "exporter.runtimes.reference:ReferenceRuntime",
        "node": "exporter.runtimes.node:NodeRuntime",
        "openvino": "exporter.runtimes.openvino:OpenVinoRuntime",
        "browser": "exporter.runtimes.browser:BrowserRuntime",
    }
)

#: Other accepted spellings (the registry calls the framework "flax"; its runtime is "jax").
ALIASES: Mapping[str, str] = MappingProxyType({"flax": "jax", "ort": "onnxruntime"})

@dataclass(frozen=True)
class IOSpec:
    """One declared input of a runtime.

    ``shape`` entries are ints (static), strings (named dynamic dims: every input using
    the same name must have the same size there) or ``None`` (dynamic, unnamed).
    ``shape=None`` means the rank itself is unknown and only name and dtype are checked.
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None

    @classmethod
    def from_tensor_spec(cls, t: TensorSpec) -> IOSpec:
        """The IOSpec of a registry ``TensorSpec`` (same name, dtype and named dims)."""
        return cls(t.name, str(np.dtype(t.dtype)), tuple(t.shape))

    def shape_text(self) -> str:
        if self.shape is None:
            return "[?]"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}


def check_threads(runtime: str, threads: Any, default: str = "the runtime's default") -> int | None:
    """``threads`` itself when it is None or an int >= 1 (not a bool); else a typed UsageError."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise UsageError(f"runtime {runtime!r}: intra_op_threads must be a positive int or None ({default}), got {threads!r}")
    return threads


def check_arrays(specs: Sequence[IOSpec], arrays: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Check ``arrays`` against declared inputs without raising.

    Checks, all collected: missing and unexpected names, non-numeric values, dtype (exact:
    no silent casts), rank, static dims, and that a named dynamic dim has one size across
    all inputs.

    Args:
        specs: the declared inputs.
        arrays: what the caller passed, keyed by input name.

    Returns:
        ``(arrays as np.ndarray keyed by declared order, problems)``; ``problems`` is empty
        when everything fits.
    """
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    declared = {s.name for s in specs}
    wanted = ", ".join(f"{s.name} ({s.dtype} {s.shape_text()})" for s in specs)
    for name in arrays:
        if name not in declared:
            problems.append(f"unexpected input {name!r}; the model takes: {wanted}")
    seen_dims: dict[str, tuple[int, str]] = {}
    for s in specs:
        if s.name not in arrays:
            problems.append(f"missing input {s.name!r} ({s.dtype} {s.shape_text()})")
            continue
        value = arrays[s.name]
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as e:
            problems.append(f"input {s.name!r}: not an array ({type(value).__name__}: {e})")
            continue
        if arr.dtype == object:
            problems.append(f"input {s.name!r}: not a numeric array (got {type(value).__name__} of objects)")
            continue
        if str(arr.dtype) != s.dtype:
            problems.append(
                f"input {s.name!r}: dtype {arr.dtype}, expected {s.dtype} (convert with .astype({s.dtype!r}))"
            )
        out[s.name] = arr
        if s.shape is None:
            continue
        if arr.ndim != len(s.shape):
            problems.append(
                f"input {s.name!r}: rank {arr.ndim} (shape {tuple(arr.shape)}), expected rank {len(s.shape)} {s.shape_text()}"
            )
            continue
        for axis, (want, got) in enumerate(zip(s.shape, arr.shape)):
            if isinstance(want, int) and got != want:
                problems.append(
                    f"input {s.name!r}: dim {axis} is {got}, expected {want} (shape {tuple(arr.shape)}, expected {s.shape_text()})"
                )
            elif isinstance(want, str):
                if want in seen_dims and seen_dims[want][0] != got:
                    size, where = seen_dims[want]
                    problems.append(
                        f"dynamic dim {want!r} is {size} in {where} but {got} in input {s.name!r} (dim {axis}); "
                        "inputs sharing a dim name must agree"
                    )
                else:
                    seen_dims.setdefault(want, (got, f"input {s.name!r}"))
    return out, problems


class Runtime(ABC):
    """A loaded model that maps named numpy inputs to named numpy outputs.

    Subclasses set ``name`` (class), and ``inputs``, ``outputs`` and ``source`` (instance,
    in ``__init__``), and implement :meth:`_run`.  Callers use :meth:`run`.
    """

    name: ClassVar[str]
    #: ``"onnx"``: the artifact is a path to an .onnx file; ``"state"``: ``(spec, canonical_state)``.
    artifact_kind: ClassVar[str] = "onnx"

    inputs: tuple[IOSpec, ...]
    outputs: tuple[str, ...]
    #: What was loaded, for messages (a path, or ``"model 'mlp' (canonical state)"``).
    source: str = ""

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once.

        Args:
            inputs: one array per declared input, keyed by name.

        Returns:
            One ``np.ndarray`` per declared output, keyed by name, in declared order.

        Raises:
            UsageError: the inputs do not fit the declared inputs (every problem listed).
        """
        arrays, problems = check_arrays(self.inputs, inputs)
        if problems:
            raise UsageError.listing(f"{self.describe()}: the inputs do not fit the model", problems)
        raw = self._run(arrays)
        got = list(raw)
        if sorted(got) != sorted(self.outputs):
            # Adapters read output names from the artifact itself, so a mismatch means the
            # model's build returned something other than what its spec declares.
            raise UsageError(
                f"{self.describe()}: returned outputs {got}, but it declares {list(self.outputs)}; "
                "the model must return exactly its declared outputs (in the spec's order)"
            )
        return {k: np.asarray(raw[k]) for k in self.outputs}

    @abstractmethod
    def _run(self, inputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """Run on checked inputs; return arrays (anything ``np.asarray`` accepts) keyed by output name."""

    def describe(self) -> str:
        """``"runtime 'onnxruntime' (path/model.onnx)"`` for messages."""
        return f"runtime {self.name!r}" + (f" ({self.source})" if self.source else "")

    def run_error(self, error: BaseException, doing: str = "failed to run") -> RunError:
        """The ``RunError`` for this runtime's own failure, in one line.

        Args:
            error: what the runtime raised (onnxruntime's Fail, a model's forward, ...).
            doing: what failed (``"failed to run"``, ``"cannot load the model"``).

        Returns:
            ``RunError("runtime 'x' (source): <doing>: <ErrorType>: <message on one line>")``.
        """
        text = " ".join(str(error).split())
        return RunError(f"{self.describe()}: {doing}: {type(error).__name__}: {text}")

    def failure_hints(self, failed: Sequence[OutputCheck]) -> list[str]:
        """Lines explaining failing checks by this runtime's own settings, with the fix.

        ``bundle.verify`` records them in the report (``ParityReport.hints``).  The default
        knows nothing; an adapter whose defaults change numerics (OpenVINO's bf16 inference
        precision) overrides it.
        """
        return []

    def prepare(self, feeds: Sequence[Mapping[str, np.ndarray]], *, wait: bool = True) -> None:
        """Get ready to run each of ``feeds`` soon (e.g. compile for their shapes ahead, in
        parallel); runs nothing and raises nothing: a feed that cannot be prepared fails
        in :meth:`run` as it would have without this call.  ``wait=False``: return at once
        and let the work go on in the background (``run`` waits for what it needs).
        Default: nothing to do."""

    def close(self) -> None:
        """Release resources (sessions, subprocesses).  Safe to call twice."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()} inputs={[i.name for i in self.inputs]} outputs={list(self.outputs)}>"


def runtime_class(name: str) -> type[Runtime]:
    """The adapter class registered as ``name`` (imports its module).

    Raises:
        UsageError: unknown runtime name (lists the known ones).
        MissingDependencyError: the adapter's framework is not installed (names the extra).
    """
    key = ALIASES.get(name, name)
    if key not in RUNTIMES:
        raise UsageError(f"unknown runtime {name!r}; known runtimes: {', '.join(RUNTIMES)}")
    module_name, _, cls_name = RUNTIMES[key].partition(":")
    try:
        # An adapter imports its framework through exporter.deps.require, which raises
        # MissingDependencyError (naming the extra) when the framework is not installed.
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise MissingDependencyError(
            f"runtime {key!r} is not available: its adapter module {module_name!r} is not installed with this copy of exporter"
        ) from e
    cls = getattr(module, cls_name, None)
    if cls is None:  # e.g. only the runtimes/js/ data directory, without its adapter module
        raise MissingDependencyError(
            f"runtime {key!r} is not available: {module_name!r} has no {cls_name}; reinstall exporter"
        )
    assert isinstance(cls, type) and issubclass(cls, Runtime), RUNTIMES[key]
    return cls


def load_runtime(name: str, artifact: Any, **kwargs: Any) -> Runtime:
    """Load ``artifact`` into the runtime called ``name``.

    Args:
        name: a key of :data:`RUNTIMES` (or an alias such as ``"flax"``).
        artifact: for ``onnxruntime``, ``reference`` and ``node`` a path to an ``.onnx`` file;
            for ``torch`` and ``jax`` a ``(spec, canonical_state)`` pair, where ``spec`` is a
            ``ModelSpec`` or a registry name.
        **kwargs: passed to the adapter (e.g. ``intra_op_threads=1`` for onnxruntime).

    Returns:
        The loaded runtime.

    Raises:
        UsageError: unknown runtime, or an artifact of the wrong kind.
        MissingDependencyError: the runtime's framework is not installed.
    """
    cls = runtime_class(name)
    if cls.artifact_kind == "state":
        if not (isinstance(artifact, (tuple, list)) and len(artifact) == 2 and isinstance(artifact[1], Mapping)):
            raise UsageError(
                f"runtime {cls.name!r} loads (model spec or name, canonical state dict), got {type(artifact).__name__}; "
                "for an .onnx file use runtime 'onnxruntime' or 'reference'"
            )
        spec, state = artifact
        if isinstance(spec, str):
            from exporter.models import registry

            spec = registry.get(spec)
        return cls(spec, state, **kwargs)
    if not isinstance(artifact, (str, os.PathLike)):
        raise UsageError(
            f"runtime {cls.name!r} loads a path to an .onnx file, got {type(artifact).__name__}; "
            "for (spec, state) use runtime 'torch' or 'jax'"
        )
    return cls(artifact, **kwargs)


def spec_io(spec: ModelSpec) -> tuple[tuple[IOSpec, ...], tuple[str, ...]]:
    """Declared inputs and outputs of a registry model (for the framework adapters)."""
    return tuple(IOSpec.from_tensor_spec(t) for t in spec.inputs), tuple(spec.outputs)


def _kind(value: Any) -> str:
    return type(value).__name__


def name_outputs(spec: ModelSpec, build: str, result: Any, array_types: tuple[type, ...]) -> dict[str, Any]:
    """Key what a framework build returned by the spec's output names.

    A build may return one array (one declared output), a tuple/list in declared order, or
    a mapping keyed by the declared names.

    Args:
        spec: the registry entry (its ``outputs``).
        build: ``"torch"`` or ``"flax"``, for messages.
        result: what the module's forward / ``apply`` returned.
        array_types: the framework's array types (``torch.Tensor``; ``jax.Array``).

    Returns:
        ``{output_name: array}`` in ``spec.outputs`` order (still framework arrays).

    Raises:
        UsageError: the build returned another number of outputs, other names, or a value
            that is not an array; the message names the model, what it returned and what the
            spec declares.
    """
    declared = list(spec.outputs)
    where = f"model {spec.name!r}: its {build} build returned"
    fix = f"the spec declares outputs {declared}; return exactly those (one array, a tuple in that order, or a dict)"
    if isinstance(result, Mapping):
        got = list(result)
        if sorted(map(str, got)) != sorted(declared) or len(got) != len(declared):
            raise UsageError(f"{where} a {_kind(result)} with keys {got}, but {fix}")
        values = [result[n] for n in declared]
    elif isinstance(result, (tuple, list)):
        if len(result) != len(declared):
            raise UsageError(f"{where} a {_kind(result)} of {len(result)} values, but {fix}")
        values = list(result)
    else:
        if len(declared) != 1:
            raise UsageError(f"{where} one {_kind(result)}, but {fix}")
        values = [result]
    wrong = [f"{n!r} is a {_kind(v)}" for n, v in zip(declared, values) if not isinstance(v, array_types)]
    if wrong:
        raise UsageError(f"{where} non-array outputs ({', '.join(wrong)}), but {fix}")
    return dict(zip(declared, values))


def onnx_path(path: str | os.PathLike[str], runtime: str) -> str:
    """``path`` as a string after checking that it is an existing file (UsageError otherwise)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise UsageError(f"runtime {runtime!r}: ONNX file {p!r} does not exist; pass the path of a model.onnx")
    if os.path.isdir(p):
        raise UsageError(
            f"runtime {runtime!r}: {p!r} is a directory, expected an .onnx file (in a bundle: {os.path.join(p, 'model.onnx')!r})"
        )
    return p


def onnx_io(model: Any, source: str = "") -> tuple[tuple[IOSpec, ...], tuple[str, ...]]:
    """Declared inputs and output names of an ``onnx.ModelProto`` (initializers are not inputs).

    Args:
        model: the loaded model.
        source: where it came from (a path), named in the message.

    Raises:
        UsageError: an input that is not a numeric tensor.
    """
    from onnx import helper

    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs: list[IOSpec] = []
    problems: list[str] = []
    for vi in graph.input:
        if vi.name in initializers:
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            problems.append(f"input {vi.name!r} is a {vi.type.WhichOneof('value')}, not a tensor")
            continue
        tt = vi.type.tensor_type
        try:
            dtype = str(np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)))
        except (KeyError, TypeError, ValueError):
            problems.append(f"input {vi.name!r} has unsupported element type {tt.elem_type}")
            continue
        if dtype == "object":
            problems.append(f"input {vi.name!r} is a string tensor")
            continue
        dims = value_dims(vi)
        inputs.append(IOSpec(vi.name, dtype, None if dims is None else tuple(dims)))
    if problems:
        raise UsageError.listing(
            f"the ONNX model{' ' + repr(source) if source else ''} has inputs exporter cannot feed "
            "(only numeric tensors are supported)",
            problems,
        )
    return tuple(inputs), tuple(o.name for o in graph.output)
