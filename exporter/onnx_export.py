"""torch.onnx / jax2onnx wrappers: dynamic dims, opset, external data, provenance metadata.

Both exporters produce an ``onnx_ir.Model`` that is finished the same way: graph inputs and
outputs named after the registry spec, dynamic dims named after the spec's dims
(``batch``, ``seq``), provenance written to ``metadata_props``, saved with ONNX external
data (``model.onnx.data``) when the weights are too big for one protobuf (or on request).

Default opset: :data:`DEFAULT_OPSET` = 20.  Why 20:

* it is the newest opset the TorchScript exporter (our fallback) supports
  (``torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET``), and torch 2.13's
  default; the dynamo exporter implements >= 18 natively, so 20 needs no version
  conversion;
* jax2onnx exports the shipped models at 18..23; at 20 GELU becomes the native ``Gelu``
  op instead of an ``Erf`` expansion;
* onnxruntime supports opset 20 since 1.17, so both onnxruntime 1.32 (Python) and
  onnxruntime-node 1.30 run it.

The noisy progress output of the exporters (``[torch.onnx] ...`` prints, registration
warnings, deprecation warnings, onnx_ir serialisation warnings) is captured and kept in
:attr:`OnnxExport.log` instead of reaching the user's terminal.

torch / jax / onnx_ir are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter import deps
from exporter.errors import ExportError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "MAX_OPSET",
    "TORCHSCRIPT_MAX_OPSET",
    "EXTERNAL_DATA_THRESHOLD",
    "EXTERNAL_DATA_NAME",
    "METADATA_PREFIX",
    "OnnxExport",
    "export_torch",
    "export_flax",
    "export_model",
    "versions",
    "captured_output",
    "check_opset",
]

DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's own implementations start at 18 (torchlib)
MAX_OPSET = 23  # the newest opset torch 2.13 and jax2onnx 0.17 both emit
TORCHSCRIPT_MAX_OPSET = 20
# protobuf refuses messages over 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
EXTERNAL_DATA_NAME = "model.onnx.data"
METADATA_PREFIX = "exporter."

EXPORTER_DYNAMO = "torch.onnx.dynamo"
EXPORTER_TORCHSCRIPT = "torch.onnx.torchscript"
EXPORTER_JAX2ONNX = "jax2onnx"

_VERSION_PACKAGES = ("exporter", "torch", "jax", "jaxlib", "flax", "jax2onnx", "onnx", "onnxscript", "onnxruntime", "numpy")


@dataclass(frozen=True)
class OnnxExport:
    """What one export produced.

    Attributes:
        path: the written ``model.onnx``.
        exporter: ``"torch.onnx.dynamo"``, ``"torch.onnx.torchscript"`` or ``"jax2onnx"``.
        fallback_reason: why the dynamo exporter was not used (None when it was).
        opset: the default-domain opset of the written model.
        external_data: whether weights were written to ``model.onnx.data``.
        weights_bytes: total bytes of the initializers.
        inputs / outputs: graph input / output names (spec order).
        input_dims / output_dims: dims of the graph inputs / outputs as saved (ints,
            dim names for dynamic dims, None where unknown; ``exporter.testdata.value_dims``).
        warnings: problems the export did not fail on but the sweep will likely catch
            (e.g. a dynamic dim the exporter specialised to its example size).
        seconds: wall time of the export.
        log: captured exporter chatter (prints, warnings, log records).
    """

    path: Path
    exporter: str
    fallback_reason: str | None
    opset: int
    external_data: bool
    weights_bytes: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    input_dims: dict[str, list[int | str | None] | None] = field(default_factory=dict)
    output_dims: dict[str, list[int | str | None] | None] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    log: str = ""

    @property
    def files(self) -> list[Path]:
        """``model.onnx`` and, with external data, ``model.onnx.data``."""
        out = [self.path]
        if self.external_data:
            out.append(self.path.parent / EXTERNAL_DATA_NAME)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "exporter": self.exporter,
            "fallback_reason": self.fallback_reason,
            "opset": self.opset,
            "external_data": self.external_data,
            "weights_bytes": self.weights_bytes,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "input_dims": {k: None if v is None else list(v) for k, v in self.input_dims.items()},
            "output_dims": {k: None if v is None else list(v) for k, v in self.output_dims.items()},
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------- helpers
def versions() -> dict[str, str | None]:
    """Installed versions of exporter and the frameworks (from package metadata; imports nothing)."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for pkg in _VERSION_PACKAGES:
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = None
    return out


@contextlib.contextmanager
def captured_output() -> Iterator[io.StringIO]:
    """Capture everything written while exporting: Python prints, warnings, log records and
    output of C/C++ code written straight to file descriptors 1 and 2.

    Yields a ``StringIO`` that holds the text once the block ends.
    """
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    # torch and onnx_ir install their own handlers on their loggers; route those loggers
    # into our buffer for the duration and restore them afterwards.
    noisy = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnx_ir", "onnxscript", "jax2onnx", "jax")]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in noisy]
    for lg in noisy:
        lg.handlers = [handler]
        lg.propagate = False
    root.addHandler(handler)
    saved_fds: list[tuple[int, int]] = []
    sink = tempfile.TemporaryFile(mode="w+b")
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        with contextlib.suppress(Exception):
            stream.flush()
        try:
            saved_fds.append((fd, os.dup(fd)))
            os.dup2(sink.fileno(), fd)
        except OSError:  # pragma: no cover - no such fd (embedded interpreters)
            pass
    py_out = io.StringIO()
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as rec, contextlib.redirect_stdout(py_out), contextlib.redirect_stderr(py_out):
            warnings.simplefilter("always")
            try:
                yield log
            finally:
                caught.extend(rec)
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()  # type: ignore[union-attr]
        for fd, dup in reversed(saved_fds):
            os.dup2(dup, fd)
            os.close(dup)
        root.removeHandler(handler)
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate
        sink.seek(0)
        native = sink.read().decode("utf-8", "replace")
        sink.close()
        text = py_out.getvalue() + native
        if text:
            log.write(text)
        for w in caught:
            log.write(f"warning {w.category.__name__}: {w.message}\n")


def check_opset(opset: int) -> None:
    """Raise ``UsageError`` unless ``opset`` is one we export (MIN_OPSET..MAX_OPSET)."""
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(
            f"opset {opset!r} is not supported; choose {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})"
        )


def _first_line(e: BaseException, limit: int = 400) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(e).__name__}: {msg[:limit]}"


def _dims_for_export(spec: ModelSpec) -> dict[str, int]:
    # torch.export specialises dims whose example size is 0 or 1, so trace at >= 2; use
    # distinct sizes for distinct dims so that two dims are never unified by accident.
    dims: dict[str, int] = {}
    used: set[int] = set()
    for d in spec.dynamic_dims():
        size = max(int(spec.dims.get(d, 2)), 2)
        while size in used:
            size += 1
        used.add(size)
        dims[d] = size
    return dims


def _dynamic_shapes(spec: ModelSpec, torch: Any) -> tuple[dict[int, Any] | None, ...]:
    """``dynamic_shapes`` for ``torch.onnx.export``: one ``torch.export.Dim`` per spec dim name,
    ``Dim.AUTO`` for a derived dim (``"past + seq"``: torch infers it; see ``exporter.dimexpr``)."""
    from exporter import dimexpr

    return dimexpr.torch_dynamic_shapes([t.shape for t in spec.inputs], torch)


# --------------------------------------------------------------------------- torch
def export_torch(
    spec: ModelSpec,
    module: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
    dynamo: bool = True,
) -> OnnxExport:
    """Export a torch module to ONNX with dynamic dims named after the spec.

    Tries ``torch.onnx.export(dynamo=True, dynamic_shapes=...)`` first; only if that raises,
    falls back to the TorchScript exporter (``dynamo=False, dynamic_axes=...``) and records
    why in ``fallback_reason``.

    Args:
        spec: registry spec (input/output names, dynamic dims).
        module: the torch module (put in eval mode here).
        path: where to write ``model.onnx`` (its directory receives ``model.onnx.data``).
        opset: ONNX opset (:data:`MIN_OPSET`..:data:`MAX_OPSET`).
        external_data: True forces external data, False forbids it, None decides by size.
        metadata: provenance written to ``metadata_props`` (keys get the ``exporter.`` prefix).
        dynamo: False skips the dynamo exporter (for tests of the fallback).

    Returns:
        An :class:`OnnxExport`.

    Raises:
        UsageError: unsupported opset.
        ExportError: both exporters failed (the message holds both reasons).
        MissingDependencyError: torch / onnxscript not installed.
    """
    check_opset(opset)
    torch = deps.require("torch", "exporting a torch model")
    start = time.perf_counter()
    module.eval()
    examples = spec.example_inputs(_dims_for_export(spec), seed=0)
    args = tuple(torch.from_numpy(examples[t.name]) for t in spec.inputs)
    input_names = [t.name for t in spec.inputs]
    output_names = list(spec.outputs)
    fallback_reason: str | None = None
    exporter_used = EXPORTER_DYNAMO
    model = None
    with captured_output() as log:
        if dynamo:
            deps.require("onnxscript", "torch.onnx.export(dynamo=True)")
            dynamic_shapes = _dynamic_shapes(spec, torch)
            try:
                with torch.no_grad():
                    program = torch.onnx.export(
                        module,
                        args,
                        None,
                        dynamo=True,
                        input_names=input_names,
                        output_names=output_names,
                        opset_version=opset,
                        dynamic_shapes=dynamic_shapes,
                        optimize=True,
                        verify=False,
                        report=False,
                    )
            except Exception as e:  # the exporter refused the user's model -> TorchScript fallback
                fallback_reason = _first_line(e)
            else:
                assert program is not None, "torch.onnx.export(dynamo=True) returned no ONNXProgram"
                model = program.model
        else:
            fallback_reason = "dynamo exporter disabled by the caller"
        if model is None:
            exporter_used = EXPORTER_TORCHSCRIPT
            model = _torchscript_export(module, args, spec, min(opset, TORCHSCRIPT_MAX_OPSET), fallback_reason)
        result = _finish(model, spec, Path(path), exporter_used, fallback_reason, external_data, metadata)
    _release_onnxscript_matchers()
    return _with_log(result, log.getvalue(), time.perf_counter() - start)


def _release_onnxscript_matchers() -> None:
    """Work around an onnxscript 0.7 leak: its pattern matchers (``SimplePatternMatcher``)
    keep the last graph they matched (``_graph``, ``_current_node``, ``_match``).  After a
    torch export that graph's initializers wrap the module's parameters, so the weights
    outlive the export (measured: +1x the weights in peak memory of the next step).  Narrow:
    only those three attributes of that one class are reset; tested in test_export.py."""
    import gc

    try:
        from onnxscript.rewriter import _basics, _matcher
    except ImportError:  # a newer onnxscript reorganised: nothing to do
        return
    matcher_type = _matcher.SimplePatternMatcher
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads obj.__class__, which some deprecated
        # torch objects answer with a FutureWarning.
        if issubclass(type(obj), matcher_type):
            for attr in ("_graph", "_current_node"):
                if hasattr(obj, attr):
                    setattr(obj, attr, None)
            if hasattr(obj, "_match"):
                obj._match = _basics.MatchResult()


def _torchscript_export(module: Any, args: tuple[Any, ...], spec: ModelSpec, opset: int, dynamo_reason: str | None) -> Any:
    import torch

    ir = deps.require("onnx_ir", "exporting a torch model")

    dynamic_axes: dict[str, dict[int, str]] = {}
    for t in spec.inputs:
        axes = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
        if axes:
            dynamic_axes[t.name] = axes
    # outputs: the batch dim is dim 0 by convention of every registry model
    for o in spec.outputs:
        dynamic_axes[o] = {0: "batch"}
    with tempfile.TemporaryDirectory(prefix="exporter-ts-") as tmp:
        f = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module,
                    args,
                    str(f),
                    dynamo=False,
                    input_names=[t.name for t in spec.inputs],
                    output_names=list(spec.outputs),
                    opset_version=opset,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
        except Exception as e:
            raise ExportError(
                f"model {spec.name!r}: torch.onnx export failed with both exporters:\n"
                f"  - dynamo: {dynamo_reason}\n  - torchscript: {_first_line(e)}\n"
                "Check that the model is traceable (no data-dependent Python control flow) and "
                "uses operators supported at this opset (try another --opset)."
            ) from e
        model = ir.load(f)
        # pull external tensors (if the exporter spilled any) into memory before tmp goes away
        for init in model.graph.initializers.values():
            if init.const_value is not None and isinstance(init.const_value, ir.ExternalTensor):
                init.const_value = ir.tensor(init.const_value.numpy(), name=init.name)
    return model


# --------------------------------------------------------------------------- flax
def export_flax(
    spec: ModelSpec,
    variables: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> OnnxExport:
    """Export a flax (linen) model to ONNX with ``jax2onnx.to_onnx`` and symbolic dims.

    The function exported is ``module.apply(variables, *inputs, **spec.flax_apply_kwargs)``;
    the variables become initializers.  Integer inputs that JAX narrows to int32 (without
    x64) get an int64 graph input with a ``Cast`` so the ONNX signature matches the spec.

    Args:
        spec: registry spec.
        variables: flax variables (``{"params": ..., "batch_stats": ...}``).
        path: where to write ``model.onnx``.
        opset: ONNX opset.
        external_data: True forces external data, False forbids it, None decides by size.
        metadata: provenance written to ``metadata_props``.

    Returns:
        An :class:`OnnxExport`.

    Raises:
        UsageError: unsupported opset.
        ExportError: jax2onnx failed.
        MissingDependencyError: jax / flax / jax2onnx not installed.
    """
    check_opset(opset)
    build = spec.factory("flax")
    jax = deps.require("jax", "exporting a flax model")
    jax2onnx = deps.require("jax2onnx", "exporting a flax model")
    import numpy as np

    start = time.perf_counter()
    module = build()
    kwargs = dict(spec.flax_apply_kwargs)

    def fn(*xs: Any) -> Any:
        return module.apply(variables, *xs, **kwargs)

    scope = jax.export.SymbolicScope()
    avals = []
    for t in spec.inputs:
        dims = ", ".join(str(d) for d in t.shape)
        dtype = np.dtype(t.dtype)
        if dtype == np.int64 and not jax.config.jax_enable_x64:
            dtype = np.dtype(np.int32)
        avals.append(jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims, scope=scope), dtype))
    from exporter import flax_scopes

    # flax_scopes: each node gets its flax module path in metadata (jax2onnx records none),
    # which `exporter explain` maps modules by; the graph itself is unchanged.
    with captured_output() as log, flax_scopes.recording():
        try:
            model = jax2onnx.to_onnx(
                fn,
                avals,
                model_name=spec.name,
                opset=opset,
                input_names=[t.name for t in spec.inputs],
                output_names=list(spec.outputs),
                return_mode="ir",
            )
        except Exception as e:
            raise ExportError(
                f"model {spec.name!r}: jax2onnx.to_onnx failed: {_first_line(e)}. "
                "Check that the flax build is jit-traceable and that its primitives are supported by jax2onnx "
                "(e.g. pass window_shape=/strides= to nn.max_pool as keywords)."
            ) from e
        _widen_int_inputs(model, spec)
        _drop_intermediate_shapes(model)
        result = _finish(model, spec, Path(path), EXPORTER_JAX2ONNX, None, external_data, metadata)
    return _with_log(result, log.getvalue(), time.perf_counter() - start)


def _widen_int_inputs(model: Any, spec: ModelSpec) -> None:
    """Make int32 graph inputs int64 where the spec says int64 (Cast to int32 inside)."""
    import onnx_ir as ir

    graph = model.graph
    for i, t in enumerate(spec.inputs):
        if t.dtype != "int64":
            continue
        old = graph.inputs[i]
        if old.dtype != ir.DataType.INT32:
            continue
        new = ir.Value(name=old.name, type=ir.TensorType(ir.DataType.INT64), shape=old.shape)
        old.name = f"{t.name}__int32"
        cast = ir.node("Cast", inputs=[new], attributes={"to": ir.DataType.INT32}, name=f"{t.name}__cast")
        old.replace_all_uses_with(cast.outputs[0])
        cast.outputs[0].name = f"{t.name}__as_int32"
        cast.outputs[0].dtype = ir.DataType.INT32
        cast.outputs[0].shape = old.shape
        graph.inputs[i] = new
        graph.insert_before(graph.node(0), cast) if graph.num_nodes() else graph.append(cast)


def _drop_intermediate_shapes(model: Any) -> None:
    # jax2onnx 0.17 leaves stale NHWC shape annotations on values its layout pass turned
    # NCHW (onnxruntime then warns "Error merging shape info").  Intermediate shapes are
    # optional hints; drop them and let the runtime infer.
    graph = model.graph
    keep = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
    for node in graph:
        for v in node.outputs:
            if id(v) not in keep:
                v.shape = None


# --------------------------------------------------------------------------- common
def _finish(
    model: Any,
    spec: ModelSpec,
    path: Path,
    exporter_used: str,
    fallback_reason: str | None,
    external_data: bool | None,
    metadata: Mapping[str, Any] | None,
) -> OnnxExport:
    import onnx
    import onnx_ir as ir

    from exporter.testdata import value_dims

    graph = model.graph
    in_names = tuple(v.name for v in graph.inputs)
    out_names = tuple(v.name for v in graph.outputs)
    problems = []
    if in_names != tuple(t.name for t in spec.inputs):
        problems.append(f"graph inputs are {list(in_names)}, expected {[t.name for t in spec.inputs]}")
    if out_names != tuple(spec.outputs):
        problems.append(f"graph outputs are {list(out_names)}, expected {list(spec.outputs)}")
    if problems:
        raise ExportError(
            f"model {spec.name!r}: the {exporter_used} export does not match the registry spec: "
            + "; ".join(problems)
            + ". Check that forward() takes the spec's inputs in order and returns its outputs in order."
        )
    from exporter import dimexpr

    dimexpr.name_onnx_dims(graph, {t.name: t.shape for t in spec.inputs})  # derived dims get the spec's names
    weights = 0
    for init in graph.initializers.values():
        if init.const_value is not None:
            weights += int(init.const_value.nbytes)
    use_external = bool(external_data) if external_data is not None else weights > EXTERNAL_DATA_THRESHOLD
    if external_data is False and weights > EXTERNAL_DATA_THRESHOLD:
        raise UsageError(
            f"model {spec.name!r}: weights are {weights} bytes, over protobuf's 2 GiB limit; "
            "they must be written as external data (do not pass external_data=False)"
        )
    props = dict(model.metadata_props)
    props[METADATA_PREFIX + "exporter"] = exporter_used
    if fallback_reason:
        props[METADATA_PREFIX + "fallback_reason"] = fallback_reason
    for key, value in (metadata or {}).items():
        props[METADATA_PREFIX + key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    model.metadata_props.clear()
    model.metadata_props.update(props)
    model.producer_name = model.producer_name or "exporter"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if use_external:
            ir.save(model, path, external_data=EXTERNAL_DATA_NAME)
            checked: str | bytes = str(path)  # the checker reads model.onnx.data beside it
        else:
            # Serialised once: the checker gets the very bytes that are written (for an
            # inline model, checking the bytes and checking the file are the same check,
            # without parsing 2x the weights back from disk).
            checked = ir.serde.serialize_model(model).SerializeToString()
            path.write_bytes(checked)
    except OSError as e:
        raise ExportError(f"model {spec.name!r}: writing {path} failed: {_first_line(e)}") from e
    try:
        onnx.checker.check_model(checked)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"model {spec.name!r}: the exported {path.name} fails onnx.checker: {_first_line(e)}") from e
    del checked  # up to 2 GiB of serialised weights: not kept while the caller goes on
    stale = path.parent / EXTERNAL_DATA_NAME
    if not use_external and stale.exists():  # from an earlier export into the same directory
        stale.unlink()
    opset = int(model.opset_imports.get("", 0))
    # The dims as written: the same ValueInfoProtos that ir.save put into model.onnx.
    in_dims = {v.name: value_dims(ir.serde.serialize_value(v)) for v in graph.inputs}
    out_dims = {v.name: value_dims(ir.serde.serialize_value(v)) for v in graph.outputs}
    warnings = []
    for t in spec.inputs:
        got = in_dims.get(t.name) or []
        for axis, want in enumerate(t.shape):
            if isinstance(want, str) and axis < len(got) and isinstance(got[axis], int):
                warnings.append(
                    f"input {t.name!r} dim {axis} ({want!r}) was fixed to {got[axis]} by {exporter_used}: the model's "
                    f"code ties it to the example size (e.g. int(x.shape[{axis}]) or a hard-coded reshape); "
                    "other sizes will fail"
                )
    return OnnxExport(
        path=path,
        exporter=exporter_used,
        fallback_reason=fallback_reason,
        opset=opset,
        external_data=use_external,
        weights_bytes=weights,
        inputs=in_names,
        outputs=out_names,
        input_dims=in_dims,
        output_dims=out_dims,
        warnings=tuple(warnings),
    )


def _with_log(result: OnnxExport, log: str, seconds: float) -> OnnxExport:
    from dataclasses import replace

    return replace(result, log=log, seconds=seconds)


def export_model(
    spec: ModelSpec,
    framework: str,
    built: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> OnnxExport:
    """Dispatch to :func:`export_torch` (``built`` = module) or :func:`export_flax` (``built`` = variables).

    Raises:
        UsageError: unknown framework.
    """
    if framework == "torch":
        return export_torch(spec, built, path, opset=opset, external_data=external_data, metadata=metadata)
    if framework == "flax":
        return export_flax(spec, built, path, opset=opset, external_data=external_data, metadata=metadata)
    raise UsageError(f"unknown framework {framework!r}; choose torch or flax")
