"""The Python API: the same operations, with the same names, as the command line.

    list_models()                       registry entries            (exporter list)
    inspect(path)                       a state file's tensors      (exporter inspect)
    export(model, ...)                  state -> ONNX -> parity     (exporter export)
    verify(bundle, runtime=...)         rerun a bundle's test data  (exporter verify)
    convert(src, dst, ...)              formats and frameworks      (exporter convert)
    train(model, ckpt_dir, steps, ...)  crash-safe training         (exporter train)

Every call returns a frozen report with ``to_dict()``; ``bool(report)`` is the verdict
where there is one.  Bad input raises a typed ``ExporterError`` before heavy work starts.
torch / jax are imported only by the operations that need them.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.errors import ExporterError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from exporter.bundle import BundleResult
    from exporter.parity import ParityReport
    from exporter.models.registry import ModelSpec

__all__ = [
    "FRAMEWORKS",
    "DEFAULT_OUT",
    "ModelInfo",
    "ExportFailure",
    "ExportReport",
    "ConvertReport",
    "list_models",
    "inspect",
    "export",
    "verify",
    "convert",
    "train",
]

FRAMEWORKS = ("torch", "flax")
DEFAULT_OUT = "out"


# --------------------------------------------------------------------------- list
@dataclass(frozen=True)
class ModelInfo:
    """One registry entry, as ``exporter list`` shows it."""

    name: str
    summary: str
    frameworks: tuple[str, ...]
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[str, ...]
    dims: dict[str, int]
    tolerances: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "frameworks": list(self.frameworks),
            "inputs": [dict(i) for i in self.inputs],
            "outputs": list(self.outputs),
            "dims": dict(self.dims),
            "tolerances": {k: dict(v) for k, v in self.tolerances.items()},
        }

    def signature(self) -> str:
        """``"x: float32[batch, 20] -> y"``."""
        ins = ", ".join(f"{i['name']}: {i['dtype']}[{', '.join(map(str, i['shape']))}]" for i in self.inputs)
        return f"{ins} -> {', '.join(self.outputs)}"


def list_models() -> list[ModelInfo]:
    """Every registered model (builtins, ``EXPORTER_REGISTRY`` modules, entry points), sorted by name.

    Imports neither torch nor jax.
    """
    from exporter.models import registry

    out = []
    for spec in registry.specs():
        tols = {o: spec.tolerance(o, "float32").to_dict() for o in spec.outputs}
        out.append(
            ModelInfo(
                name=spec.name,
                summary=spec.summary,
                frameworks=tuple(spec.frameworks),
                inputs=tuple({"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.inputs),
                outputs=tuple(spec.outputs),
                dims=dict(spec.dims),
                tolerances=tols,
            )
        )
    return out


# --------------------------------------------------------------------------- inspect
def inspect(path: str | os.PathLike[str]) -> Any:
    """Format, tensors (name, dtype, shape, bytes), total bytes and sha256 of a saved state.

    Same as ``exporter.state.inspect_state``.

    Raises:
        StateFileError: the file cannot be read.
    """
    from exporter.state import inspect_state

    return inspect_state(path)


# --------------------------------------------------------------------------- export
@dataclass(frozen=True)
class ExportFailure:
    """A (model, framework) that could not be exported (the typed error, as text)."""

    model: str
    framework: str
    error: str
    message: str
    exit_code: int = 2

    def line(self) -> str:
        return f"{self.model} ({self.framework}): {self.error}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "framework": self.framework, "error": self.error, "message": self.message}


@dataclass(frozen=True)
class ExportReport:
    """Every bundle an ``export`` call wrote, and every (model, framework) that failed.

    ``bool(report)`` is True only when something was exported, nothing failed to export,
    and every bundle passed its parity sweep.
    """

    out: Path
    results: tuple[BundleResult, ...]
    errors: tuple[ExportFailure, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return bool(self.results) and not self.errors and all(r.ok for r in self.results)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def exit_code(self) -> int:
        """0 pass, 1 a parity failure, 2 an export error."""
        if self.errors or not self.results:
            return 2
        return 0 if self.ok else 1

    def failures(self) -> list[str]:
        lines = [e.line() for e in self.errors]
        for r in self.results:
            lines += [f"{r.model} ({r.framework}): {f}" for f in r.parity.failures()]
        return lines

    def summary(self) -> str:
        passed = sum(r.ok for r in self.results)
        failed = len(self.results) - passed
        parts = [f"{passed} passed", f"{failed} failed parity"]
        if self.errors:
            parts.append(f"{len(self.errors)} could not be exported")
        n = len(self.results) + len(self.errors)
        return f"{'PASS' if self.ok else 'FAIL'}: {n} bundle{'' if n == 1 else 's'} under {self.out}: " + ", ".join(parts)

    def table(self) -> str:
        """Readable text: per bundle its headline and parity table; errors; the summary."""
        blocks = [r.table() for r in self.results]
        blocks += [f"{e.model} ({e.framework}): ERROR {e.error}: {e.message}" for e in self.errors]
        blocks.append(self.summary())
        return "\n\n".join(blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "out": str(self.out),
            "results": [r.to_dict() for r in self.results],
            "errors": [e.to_dict() for e in self.errors],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_junit_xml(self) -> str:
        """One ``<testsuites>`` holding every bundle's parity suite and a suite of export errors."""
        return merge_junit([r.parity for r in self.results], self.errors)


def merge_junit(reports: Sequence[ParityReport], errors: Sequence[ExportFailure] = ()) -> str:
    """JUnit XML for several parity reports (and export errors) in one ``<testsuites>``."""
    root = ET.Element("testsuites", name="exporter")
    tests = failures = n_errors = 0
    for rep in reports:
        for suite in ET.fromstring(rep.to_junit_xml()).iter("testsuite"):
            root.append(suite)
            tests += int(suite.get("tests", "0"))
            failures += int(suite.get("failures", "0"))
    if errors:
        suite = ET.SubElement(root, "testsuite", name="export", tests=str(len(errors)), failures="0", errors=str(len(errors)))
        for e in errors:
            tc = ET.SubElement(suite, "testcase", classname=f"export.{e.model}", name=e.framework, time="0")
            ET.SubElement(tc, "error", message=e.message.splitlines()[0] if e.message else "", type=e.error).text = e.message
        tests += len(errors)
        n_errors += len(errors)
    root.set("tests", str(tests))
    root.set("failures", str(failures))
    root.set("errors", str(n_errors))
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _resolve_models(model: str | Sequence[str] | None, all_models: bool) -> list[ModelSpec]:
    from exporter.models import registry

    if all_models:
        if model:
            raise UsageError("pass either model names or all_models=True (--all), not both")
        return registry.specs()
    if not model:
        raise UsageError("no model given; pass a registry name (see `exporter list`) or all_models=True (--all)")
    names = [model] if isinstance(model, str) else list(model)
    problems = []
    specs = []
    for n in dict.fromkeys(names):
        try:
            specs.append(registry.get(n))
        except ExporterError as e:
            problems.append(str(e))
    if problems:
        from exporter.errors import UnknownModelError

        raise UnknownModelError("; ".join(problems))
    return specs


def _frameworks(spec: ModelSpec, framework: str) -> list[str]:
    if framework == "all":
        return [f for f in FRAMEWORKS if f in spec.frameworks]
    if framework not in FRAMEWORKS:
        raise UsageError(f"unknown framework {framework!r}; choose torch, flax or all")
    if framework not in spec.frameworks:
        raise UsageError(f"model {spec.name!r} has no {framework} build (it has: {', '.join(spec.frameworks)})")
    return [framework]


def _load_checkpoint(
    spec: ModelSpec, checkpoint: str | os.PathLike[str], rename: Sequence[tuple[str, str]] = ()
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from exporter import rebuild, state

    path = Path(checkpoint)
    fmt = state.sniff(path)
    if fmt == "exporter-checkpoint":
        # A training checkpoint directory: use (and record the hash of) the one step whose
        # model part is exported -- the newest valid one -- and check it was trained for
        # this model.
        from exporter import checkpoint as ckpt

        used = ckpt.model_checkpoint(path, model=spec.name)
        path, raw = Path(used.path), dict(used.group("model"))
    else:
        raw = state.load_state(path)
    canonical, _ = rebuild.prepare_state(spec, raw, strict=True, rename=rename, source=str(path))
    info = {"path": str(path.resolve()), "format": fmt, "sha256": state.sha256_path(path)}
    return canonical, info


def _sweep_dims(
    spec: ModelSpec, dims: Mapping[str, int | Sequence[int]] | None, *, several: bool
) -> Mapping[str, int | Sequence[int]] | None:
    """The non-batch dims to sweep for ``spec``: the user's, else the model's ``sweep_dims``.

    With several models, a user dim applies to the models that have it (``--all --dims
    seq=8`` sweeps seq where there is one); with one model an unknown dim is an error.
    """
    if dims is None:
        return dict(spec.sweep_dims) or None
    if several:
        have = spec.dynamic_dims()
        return {d: v for d, v in dims.items() if d in have} or None
    return dims


def export(
    model: str | Sequence[str] | None = None,
    *,
    all_models: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    framework: str = "all",
    out: str | os.PathLike[str] = DEFAULT_OUT,
    opset: int | None = None,
    batch_sizes: Sequence[int] | None = None,
    dims: Mapping[str, int | Sequence[int]] | None = None,
    rename: Sequence[tuple[str, str]] = (),
    atol: float | None = None,
    rtol: float | None = None,
    inputs: str | os.PathLike[str] | None = None,
    seed: int = 0,
    external_data: bool | None = None,
    intra_op_threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Rebuild, export to ONNX and check parity; one bundle per (model, framework) under ``out``.

    Without ``checkpoint`` a seeded initial state is saved into each bundle as
    ``state.safetensors`` and the model is rebuilt from that file (one state per model,
    shared by its torch and flax exports).  With ``checkpoint`` (any format
    ``exporter.state`` reads, including a training checkpoint directory) the state is
    loaded strictly: every missing/unexpected/mismatched key is an error.

    When a single (model, framework) is exported, its errors are raised; when several are,
    an export error of one is recorded in the report and the others continue.

    Args:
        model: a registry name or a list of names.
        all_models: export every registered model (``--all``).
        checkpoint: saved state to export (only with a single model).
        framework: ``"torch"``, ``"flax"`` or ``"all"`` (every build the model has).
        out: output root; bundles go to ``out/<model>/<framework>``.
        opset: ONNX opset (default ``exporter.onnx_export.DEFAULT_OPSET``, 20).
        batch_sizes: batch sizes of the parity sweep (default 1, 2, 7, 64).
        dims: sizes of other dynamic dims to cross with the batch sizes
            (``{"seq": (1, 16, 64)}``); default: each model's ``sweep_dims``.
        rename: ``(regex, replacement)`` rules applied to the checkpoint's keys before the
            strict check (after the usual prefix stripping and the model's own rules).
        atol, rtol: tolerance overrides (default: the model's, dtype-aware).
        inputs: an ``.npz`` of user inputs, checked as one more case.
        seed: seed of the initial state and the sweep's inputs.
        external_data: force (True) / forbid (False) ``model.onnx.data``; None = when > 2 GiB.
        intra_op_threads: onnxruntime threads (None = its default).
        progress: called with one line per bundle started/finished (the CLI prints to stderr).

    Returns:
        An :class:`ExportReport`; ``bool(report)`` is the verdict.

    Raises:
        UnknownModelError, UsageError, StateFileError, StateMismatchError: bad input.
        ExportError, MissingDependencyError: when a single bundle is exported.
    """
    from exporter import bundle, onnx_export, parity

    specs = _resolve_models(model, all_models)
    if checkpoint is not None and len(specs) != 1:
        raise UsageError("--checkpoint holds the state of one model; export one model with it, not several")
    if opset is not None:
        onnx_export.check_opset(opset)
    parity.tolerance_for(None, atol=atol, rtol=rtol)  # validates atol/rtol
    sizes = parity.DEFAULT_BATCH_SIZES if batch_sizes is None else tuple(batch_sizes)
    if framework != "all" and framework not in FRAMEWORKS:
        raise UsageError(f"unknown framework {framework!r}; choose torch, flax or all")
    targets: list[tuple[ModelSpec, list[str]]] = []
    for spec in specs:
        parity.sweep_cases(spec, sizes, _sweep_dims(spec, dims, several=len(specs) > 1))
        if inputs is not None:
            parity.load_inputs(inputs, spec)
        if len(specs) == 1:
            fws = _frameworks(spec, framework)
        else:  # several models: export each from the requested builds it has
            fws = [f for f in (FRAMEWORKS if framework == "all" else (framework,)) if f in spec.frameworks]
        if fws:
            targets.append((spec, fws))
    if checkpoint is not None and not Path(checkpoint).exists():
        raise UsageError(f"checkpoint {str(checkpoint)!r} does not exist; pass a state file or a training checkpoint directory")

    total = sum(len(f) for _, f in targets)
    single = total == 1
    out_root = Path(out)
    results: list[BundleResult] = []
    errors: list[ExportFailure] = []
    k = 0
    for spec, fws in targets:
        canonical = ckpt_info = seeded = None
        try:
            if checkpoint is not None:
                canonical, ckpt_info = _load_checkpoint(spec, checkpoint, rename)
            else:
                from exporter import rebuild

                seeded = rebuild.init_state(spec, seed=seed, framework=fws[0])
        except ExporterError as e:
            if single or checkpoint is not None:
                raise
            k += len(fws)
            errors += [ExportFailure(spec.name, fw, type(e).__name__, str(e), e.exit_code) for fw in fws]
            if progress:
                progress(f"[{k}/{total}] {spec.name}: ERROR {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        # The checkpoint was loaded (and strictly checked) once up front; hand it to the first
        # bundle as a loader so that build() holds the only reference and can free the
        # weights before onnxruntime loads its copy; later frameworks reload it.
        held = [canonical] if canonical is not None else []
        canonical = None

        def state_loader(spec: ModelSpec = spec, held: list[Any] = held) -> dict[str, np.ndarray]:
            return held.pop() if held else _load_checkpoint(spec, checkpoint, rename)[0]  # type: ignore[arg-type]

        for fw in fws:
            k += 1
            if progress:
                progress(f"[{k}/{total}] {spec.name} ({fw}): exporting ...")
            t = time.perf_counter()
            try:
                r = bundle.build(
                    spec,
                    fw,
                    out_root / spec.name / fw,
                    canonical=state_loader if checkpoint is not None else None,
                    checkpoint=ckpt_info,
                    initial_state=seeded,
                    opset=opset,
                    batch_sizes=sizes,
                    extra_dims=_sweep_dims(spec, dims, several=len(specs) > 1),
                    atol=atol,
                    rtol=rtol,
                    inputs=inputs,
                    seed=seed,
                    external_data=external_data,
                    intra_op_threads=intra_op_threads,
                )
            except ExporterError as e:
                if single:
                    raise
                errors.append(ExportFailure(spec.name, fw, type(e).__name__, str(e), e.exit_code))
                if progress:
                    progress(f"[{k}/{total}] {spec.name} ({fw}): ERROR {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            results.append(r)
            if progress:
                progress(f"[{k}/{total}] {spec.name} ({fw}): {'PASS' if r.ok else 'FAIL'} ({time.perf_counter() - t:.1f} s)")
    return ExportReport(out=out_root, results=tuple(results), errors=tuple(errors))


# --------------------------------------------------------------------------- verify
def verify(
    bundle: str | os.PathLike[str],
    runtime: str = "onnxruntime",
    *,
    atol: float | None = None,
    rtol: float | None = None,
    check_hashes: bool = True,
    **runtime_kwargs: Any,
) -> ParityReport:
    """Rerun a bundle's test data (``exporter.bundle.verify``); needs only onnx + the runtime.

    Args:
        bundle: the bundle directory ``OUT/<model>/<framework>``.
        runtime: ``"onnxruntime"``, ``"reference"`` or ``"node"``.
        atol, rtol: override the manifest's tolerances.
        check_hashes: fail when model.onnx's sha256 differs from the manifest's.
        **runtime_kwargs: passed to the runtime.

    Returns:
        A ParityReport; ``bool(report)`` is the verdict.

    Raises:
        UsageError: not a bundle / incomplete / unknown runtime.
        MissingDependencyError: the runtime is not installed.
    """
    from exporter import bundle as _bundle

    return _bundle.verify(bundle, runtime, atol=atol, rtol=rtol, check_hashes=check_hashes, **runtime_kwargs)


# --------------------------------------------------------------------------- convert
@dataclass(frozen=True)
class ConvertReport:
    """What ``convert`` wrote."""

    src: Path
    dst: Path
    src_format: str
    dst_format: str
    layout: str
    model: str | None
    tensors: int
    total_bytes: int
    sha256: str

    def line(self) -> str:
        what = f"{self.model} ({self.layout} layout)" if self.model else "keys as stored"
        return (
            f"{self.src} ({self.src_format}) -> {self.dst} ({self.dst_format}): {self.tensors} tensors, "
            f"{self.total_bytes} bytes, {what}; sha256 {self.sha256}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": str(self.src),
            "dst": str(self.dst),
            "src_format": self.src_format,
            "dst_format": self.dst_format,
            "layout": self.layout,
            "model": self.model,
            "tensors": self.tensors,
            "total_bytes": self.total_bytes,
            "sha256": self.sha256,
        }


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    model: str | None = None,
    to: str | None = None,
    format: str | None = None,
    rename: Sequence[tuple[str, str]] = (),
) -> ConvertReport:
    """Convert saved state between formats (by ``dst``'s extension or ``format``) and frameworks.

    Without ``model`` the tensors are copied under their stored names.  With ``model`` the
    state is checked strictly against the model (prefixes stripped, flax layout detected)
    and written in canonical torch layout (``to="torch"``, the default) or flax layout
    (``to="flax"``: ``params/<path>/<leaf>`` and ``batch_stats/...`` keys).

    Args:
        src: the state to read (format sniffed from its bytes).
        dst: where to write (``.safetensors``, ``.pt``/``.pth``, ``.npz``, ``.msgpack``, a
            directory for orbax).
        model: registry name whose layout to check and convert.
        to: ``"torch"`` (canonical) or ``"flax"``; needs ``model``.
        format: output format overriding ``dst``'s extension.
        rename: ``(regex, replacement)`` key renames applied before the check (needs ``model``).

    Returns:
        A :class:`ConvertReport`.

    Raises:
        UsageError: ``to`` without ``model``, unknown ``to``.
        StateFileError: unreadable ``src``; StateMismatchError: state does not fit ``model``.
    """
    from exporter import state

    if to is not None and to not in ("torch", "flax", "canonical"):
        raise UsageError(f"unknown target layout {to!r}; choose torch (canonical) or flax")
    if to is not None and model is None:
        raise UsageError("converting between frameworks needs the model: pass model= (--model NAME) with to= (--to)")
    if rename and model is None:
        raise UsageError("renaming keys needs the model they must fit: pass model= (--model NAME) with rename= (--rename)")
    src_p, dst_p = Path(src), Path(dst)
    if src_p.resolve() == dst_p.resolve():
        raise UsageError(f"source and destination are the same path ({src_p}); pick another destination")
    src_format = state.sniff(src_p)
    raw = state.load_state(src_p)
    layout = "as stored"
    arrays: dict[str, Any] = dict(raw)
    if model is not None:
        from exporter import layouts, rebuild
        from exporter.models import registry

        spec = registry.get(model)
        canonical, _ = rebuild.prepare_state(spec, raw, strict=True, rename=rename, source=str(src_p))
        if to == "flax":
            arrays = layouts.flatten_flax(layouts.to_flax(canonical, spec.layout))
            layout = "flax"
        else:
            arrays = dict(canonical)
            layout = "torch"
    to_safetensors = format == "safetensors" or (format is None and dst_p.suffix == ".safetensors")
    # one key: safetensors orders several metadata keys differently from run to run
    metadata = {"exporter": json.dumps({"converted_from": src_p.name, "layout": layout, "model": model}, sort_keys=True)}
    written = state.save_state(arrays, dst_p, format=format, metadata=metadata if to_safetensors else None)
    info = state.inspect_state(written)
    return ConvertReport(
        src=src_p,
        dst=Path(written),
        src_format=src_format,
        dst_format=info.format,
        layout=layout,
        model=model,
        tensors=len(info.tensors),
        total_bytes=int(info.total_bytes),
        sha256=info.sha256,
    )


# --------------------------------------------------------------------------- train
def train(model: str, ckpt_dir: str | os.PathLike[str], steps: int, **kwargs: Any) -> Any:
    """Train a registry model with crash-safe checkpoints and auto-resume (``exporter.training.train``).

    Args:
        model: registry name.
        ckpt_dir: checkpoint directory (resumed from when it holds a run).
        steps: total steps.
        **kwargs: ``every``, ``keep``, ``keep_every``, ``framework``, ``seed``, ... (see
            ``exporter.training.train``).

    Returns:
        The ``TrainResult``.
    """
    from exporter.training import train as _train

    return _train(model, ckpt_dir, steps, **kwargs)
