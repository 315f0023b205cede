"""The bundle directory: model.onnx, manifest.json, parity reports and ONNX model-zoo test data.

Layout of ``OUT/<model>/<framework>/``::

    model.onnx               (+ model.onnx.data: ONNX external data, > 2 GiB or on request)
    manifest.json            format "exporter-bundle", format_version 1 (provenance, see below)
    parity.json              the ParityReport of the export's sweep (exporter.parity)
    parity.junit.xml         the same as JUnit XML for CI
    state.safetensors        the seeded state, only when no checkpoint was given
    test_data_set_<k>/       one per sweep case: input_<i>.pb, output_<i>.pb (TensorProto,
                             named after the ONNX inputs/outputs); outputs are the ORIGINAL
                             framework's outputs, so any runtime can be checked against them

:func:`build` writes a bundle atomically (``exporter.atomic.atomic_dir``: a temp directory
beside the final name, renamed in when complete), so an interrupted export never leaves a
half bundle under the final name.  :func:`verify` reruns the test data in onnxruntime (or
the ONNX reference evaluator, or Node) and needs only onnx + onnxruntime: it never imports
torch or jax.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter import atomic
from exporter.errors import UsageError, format_problems

if TYPE_CHECKING:  # pragma: no cover
    from exporter.parity import OutputCheck, ParityReport
    from exporter.models.registry import ModelSpec
    from exporter.runtimes.base import Runtime

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST",
    "ONNX_FILE",
    "STATE_FILE",
    "BundleResult",
    "build",
    "verify",
    "read_manifest",
    "find_bundles",
    "write_test_data",
    "read_test_data",
    "sha256_file",
]

BUNDLE_FORMAT = "exporter-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
STATE_FILE = "state.safetensors"
PARITY_JSON = "parity.json"
PARITY_JUNIT = "parity.junit.xml"
TEST_DATA_PREFIX = "test_data_set_"
EXPORT_LOG = "export.log"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _state_metadata(model: str, seed: int) -> dict[str, str]:
    # One key only: safetensors writes __metadata__ from a Rust HashMap, so with several keys
    # their order (and the file's sha256) changes from run to run.
    return {"exporter": json.dumps({"model": model, "seed": seed}, sort_keys=True)}


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class BundleResult:
    """One exported bundle and its verdict.

    Attributes:
        model, framework: what was exported.
        path: the bundle directory (final name).
        exporter: which ONNX exporter produced model.onnx.
        fallback_reason: why the dynamo exporter was not used (torch only), else None.
        opset: the ONNX opset of model.onnx.
        onnx_sha256: sha256 of model.onnx.
        external_data: whether weights live in model.onnx.data.
        checkpoint: path/format/sha256 of the state the model was rebuilt from.
        parity: the sweep's ParityReport (onnxruntime vs the original framework).
        seconds: wall time per phase (state, export, parity, total).
        warnings: export warnings (e.g. a dynamic dim fixed by the exporter).
    """

    model: str
    framework: str
    path: Path
    exporter: str
    fallback_reason: str | None
    opset: int
    onnx_sha256: str
    external_data: bool
    checkpoint: dict[str, Any]
    parity: ParityReport
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.parity.ok

    def __bool__(self) -> bool:
        return self.ok

    def headline(self) -> str:
        """``"mlp (torch): PASS -> out/mlp/torch  [torch.onnx.dynamo, opset 20, 3.2 s]"``."""
        verdict = "PASS" if self.ok else "FAIL"
        extra = f", fallback: {self.fallback_reason}" if self.fallback_reason else ""
        return (
            f"{self.model} ({self.framework}): {verdict} -> {self.path}  "
            f"[{self.exporter}, opset {self.opset}{extra}, {self.seconds.get('total', 0.0):.1f} s]"
        )

    def table(self) -> str:
        """The headline, export warnings and the parity table."""
        warn = "".join(f"\n  warning: {w}" for w in self.warnings)
        return self.headline() + warn + "\n" + self.parity.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "framework": self.framework,
            "path": str(self.path),
            "ok": self.ok,
            "exporter": self.exporter,
            "fallback_reason": self.fallback_reason,
            "opset": self.opset,
            "onnx_sha256": self.onnx_sha256,
            "external_data": self.external_data,
            "checkpoint": dict(self.checkpoint),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "warnings": list(self.warnings),
            "parity": self.parity.to_dict(),
        }


# --------------------------------------------------------------------------- test data
def write_test_data(directory: Path, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
    """Write one ONNX model-zoo test data set: ``input_<i>.pb`` / ``output_<i>.pb`` in the given order.

    Files go through ``exporter.atomic`` like every file we write.
    """
    from onnx import numpy_helper

    directory.mkdir(parents=True, exist_ok=True)
    for prefix, arrays in (("input", inputs), ("output", outputs)):
        for i, (name, value) in enumerate(arrays.items()):
            tensor = numpy_helper.from_array(np.ascontiguousarray(value), name=name)
            atomic.write_bytes(directory / f"{prefix}_{i}.pb", tensor.SerializeToString())


def read_test_data(directory: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read one test data set back: ``(inputs, outputs)`` keyed by the TensorProto names, in file order.

    Raises:
        UsageError: no input files, or a file that is not a TensorProto.
    """
    from onnx import TensorProto, numpy_helper

    d = Path(directory)
    result: list[dict[str, np.ndarray]] = []
    for prefix in ("input", "output"):
        files = sorted(d.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[-1]) if p.stem.split("_")[-1].isdigit() else -1)
        arrays: dict[str, np.ndarray] = {}
        for f in files:
            t = TensorProto()
            try:
                t.ParseFromString(f.read_bytes())
                arr = numpy_helper.to_array(t)
            except Exception as e:  # protobuf DecodeError and friends
                raise UsageError(f"test data file {f} is not a valid ONNX TensorProto ({e}); re-export the bundle") from e
            arrays[t.name or f.stem] = arr
        result.append(arrays)
    if not result[0]:
        raise UsageError(f"test data set {d} has no input_<i>.pb files; re-export the bundle")
    return result[0], result[1]


# --------------------------------------------------------------------------- manifest
def read_manifest(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a bundle directory.

    Raises:
        UsageError: not a directory, no manifest, unreadable or not an exporter bundle.
    """
    d = Path(bundle)
    if not d.is_dir():
        raise UsageError(f"bundle {str(d)!r} is not a directory; pass OUT/<model>/<framework> written by `exporter export`")
    path = d / MANIFEST
    if not path.is_file():
        raise UsageError(
            f"{str(d)!r} is not an exporter bundle: {MANIFEST} is missing; pass OUT/<model>/<framework> written by `exporter export`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} cannot be read as JSON ({e}); re-export the bundle") from e
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UsageError(f"{path} is not an exporter bundle manifest (format {got!r}, expected {BUNDLE_FORMAT!r})")
    if int(manifest.get("format_version", 0)) > BUNDLE_FORMAT_VERSION:
        raise UsageError(
            f"{path} has format_version {manifest.get('format_version')}, newer than this exporter reads "
            f"({BUNDLE_FORMAT_VERSION}); upgrade exporter"
        )
    return manifest


def find_bundles(path: str | os.PathLike[str]) -> list[Path]:
    """Bundle directories at or below ``path``: itself when it holds a manifest, else
    ``*/manifest.json`` and ``*/*/manifest.json`` (an export's OUT directory), sorted.

    Raises:
        UsageError: ``path`` does not exist or holds no bundle.
    """
    p = Path(path)
    if p.is_file() and p.name in (ONNX_FILE, MANIFEST):
        p = p.parent
    if not p.exists():
        raise UsageError(f"bundle {str(p)!r} does not exist; pass a directory written by `exporter export`")
    if (p / MANIFEST).is_file() or not p.is_dir():
        return [p]
    found = sorted({m.parent for pattern in (f"*/{MANIFEST}", f"*/*/{MANIFEST}") for m in p.glob(pattern)})
    if not found:
        raise UsageError(
            f"{str(p)!r} holds no exporter bundle ({MANIFEST} not found in it or two levels below); "
            "pass OUT/<model>/<framework> written by `exporter export`"
        )
    return found


def _tensor_specs(spec: ModelSpec, outputs: Mapping[str, np.ndarray], out_shapes: Mapping[str, list[Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ins = [{"name": t.name, "dtype": str(np.dtype(t.dtype)), "shape": list(t.shape)} for t in spec.inputs]
    outs = [{"name": o, "dtype": str(np.asarray(outputs[o]).dtype), "shape": out_shapes.get(o)} for o in spec.outputs if o in outputs]
    return ins, outs


def _onnx_output_shapes(path: Path) -> dict[str, list[Any]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes: dict[str, list[Any]] = {}
    for o in model.graph.output:
        dims: list[Any] = []
        for d in o.type.tensor_type.shape.dim:
            kind = d.WhichOneof("value")
            dims.append(d.dim_value if kind == "dim_value" else d.dim_param if kind == "dim_param" else None)
        shapes[o.name] = dims
    return shapes


# --------------------------------------------------------------------------- build
_COLLECT_ABOVE = 256 << 20  # bytes of weights above which the framework's copy is collected before onnxruntime loads


def build(
    spec: ModelSpec,
    framework: str,
    bundle_dir: str | os.PathLike[str],
    *,
    canonical: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]] | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    initial_state: Mapping[str, np.ndarray] | None = None,
    opset: int | None = None,
    batch_sizes: Sequence[int] | None = None,
    extra_dims: Mapping[str, int | Sequence[int]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    external_data: bool | None = None,
    intra_op_threads: int | None = None,
) -> BundleResult:
    """Export one model from one framework into a bundle and run the parity sweep.

    The steps, inside a temp directory that is renamed to ``bundle_dir`` only when all
    files are written:

    1. state: with ``canonical`` (a checkpoint already loaded and checked by the caller)
       use it; without, a seeded ``exporter.rebuild.init_state`` is saved to
       ``state.safetensors`` and read back through ``exporter.state.load_state`` +
       ``prepare_state`` (strict), so the saved-state path always runs;
    2. rebuild the framework model from that state;
    3. export to ONNX (``exporter.onnx_export``), provenance in ``metadata_props``;
    4. parity sweep (``exporter.parity.check``) of onnxruntime against the framework at
       every batch size (and the user's inputs), recording test data;
    5. write test data sets, parity.json, parity.junit.xml, manifest.json.

    A failing sweep still publishes the bundle (its reports say why); the verdict is in
    the result.

    Args:
        spec: the registry entry.
        framework: ``"torch"`` or ``"flax"``.
        bundle_dir: the final bundle directory (replaced if it exists).
        canonical: canonical state from a checkpoint (then ``checkpoint`` describes it), or
            a zero-argument loader returning it (so that only ``build`` holds the arrays
            and can free them before onnxruntime loads its copy).
        checkpoint: ``{"path", "format", "sha256"}`` of the checkpoint file.
        initial_state: the seeded state to save when there is no checkpoint (default:
            ``rebuild.init_state(spec, seed, framework)``); lets the torch and flax bundles
            of one model share one state.
        opset: ONNX opset (default ``onnx_export.DEFAULT_OPSET``).
        batch_sizes: sweep batch sizes (default 1, 2, 7, 64).
        extra_dims: sizes of other dynamic dims to sweep (``{"seq": (8, 17)}``); default
            ``spec.sweep_dims``.
        atol, rtol: tolerance overrides.
        inputs: user inputs (``.npz`` path or dict) run as one more case.
        seed: seed of the initial state and of the sweep's inputs.
        external_data: force (True) / forbid (False) ONNX external data; None = by size.
        intra_op_threads: onnxruntime threads (None = its default).

    Returns:
        The :class:`BundleResult`.

    Raises:
        ExporterError: a typed error for bad input, a failed export, a missing dependency.
    """
    from exporter import onnx_export, parity, rebuild
    from exporter import state as state_io

    opset = onnx_export.DEFAULT_OPSET if opset is None else opset
    if framework not in spec.frameworks:
        raise UsageError(f"model {spec.name!r} has no {framework} build (it has: {', '.join(spec.frameworks)})")
    # Validate cheap things before any heavy work.
    tol = parity.tolerance_for(spec, atol=atol, rtol=rtol)
    if extra_dims is None:
        extra_dims = dict(spec.sweep_dims) or None
    cases = parity.sweep_cases(spec, parity.DEFAULT_BATCH_SIZES if batch_sizes is None else batch_sizes, extra_dims)
    final = Path(bundle_dir)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    with atomic.atomic_dir(final) as tmp:
        # 1. state
        if canonical is None:
            seeded = dict(initial_state) if initial_state is not None else rebuild.init_state(spec, seed=seed, framework=framework)
            state_path = tmp / STATE_FILE
            state_io.save_state(seeded, state_path, metadata=_state_metadata(spec.name, seed))
            seeded = None  # the copy read back from the file is the one used (and freed below)
            canonical, _ = rebuild.prepare_state(spec, state_io.load_state(state_path), strict=True, source=str(final / STATE_FILE))
            ckpt = {"path": STATE_FILE, "format": "safetensors", "sha256": sha256_file(state_path), "seeded": True, "seed": seed}
        else:
            if callable(canonical):  # a loader: build then holds the only reference (freed below)
                canonical = canonical()
            ckpt = {"seeded": False, **dict(checkpoint or {})}
        seconds["state"] = time.perf_counter() - t0

        # 2. rebuild + reference runtime
        t = time.perf_counter()
        if framework == "torch":
            from exporter.runtimes.torch import TorchRuntime

            built: Any = rebuild.torch_module(spec, canonical)
            reference: Runtime = TorchRuntime.from_module(spec, built)
        else:
            from exporter.runtimes.jax import JaxRuntime

            built = rebuild.flax_variables(spec, canonical)
            reference = JaxRuntime.from_variables(spec, built)

        # 3. export (output dtypes from one reference run, for the recorded tolerances)
        probe = reference.run(spec.example_inputs(cases[0], seed=seed))
        metadata = {
            "model": spec.name,
            "framework": framework,
            "checkpoint_path": str(ckpt.get("path", "")),
            "checkpoint_format": str(ckpt.get("format", "")),
            "checkpoint_sha256": str(ckpt.get("sha256", "")),
            "opset": str(opset),
            "tolerances": {o: tol(o, str(probe[o].dtype)).to_dict() for o in spec.outputs},
            "versions": onnx_export.versions(),
        }
        onnx_path = tmp / ONNX_FILE
        exported = onnx_export.export_model(spec, framework, built, onnx_path, opset=opset, external_data=external_data, metadata=metadata)
        seconds["export"] = time.perf_counter() - t
        if exported.log:
            atomic.write_text(tmp / EXPORT_LOG, exported.log)

        # 4. parity sweep: the framework runs every case first and is then freed, so that
        # onnxruntime's copy of the weights is not held beside the framework's (peak memory
        # of large exports: about 1x the weights instead of 2x).
        t = time.perf_counter()
        from exporter.runtimes.onnxruntime import OnnxRuntime

        runs = parity.plan_runs(spec, cases=cases, seed=seed, inputs=inputs)
        expected = [reference.run(feed) for _label, _dims, feed in runs]
        reference_name = reference.name
        reference.close()
        del reference, built, probe
        canonical = None
        if exported.weights_bytes >= _COLLECT_ABOVE:  # a full collection costs ~0.2 s; worth it only for big weights
            gc.collect()
        candidate = OnnxRuntime(onnx_path, intra_op_threads=intra_op_threads)
        report = parity.check_runs(
            spec, runs, expected, candidate, reference=reference_name, seed=seed, atol=atol, rtol=rtol, framework=framework
        )
        seconds["parity"] = time.perf_counter() - t

        # 5. files
        sets = []
        for k, ((label, dims, feed), out) in enumerate(zip(runs, expected)):
            name = f"{TEST_DATA_PREFIX}{k}"
            ordered_in = {t.name: feed[t.name] for t in spec.inputs}
            ordered_out = {o: out[o] for o in spec.outputs}
            write_test_data(tmp / name, ordered_in, ordered_out)
            sets.append({"dir": name, "case": label, "dims": dict(dims)})
        atomic.write_text(tmp / PARITY_JSON, report.to_json())
        atomic.write_text(tmp / PARITY_JUNIT, report.to_junit_xml())
        first_out = expected[0] if expected else {}
        ins, outs = _tensor_specs(spec, first_out, _onnx_output_shapes(onnx_path))
        onnx_sha = sha256_file(onnx_path)
        onnx_info: dict[str, Any] = {"file": ONNX_FILE, "sha256": onnx_sha, "bytes": onnx_path.stat().st_size, "external_data": None}
        if exported.external_data:
            data = tmp / onnx_export.EXTERNAL_DATA_NAME
            onnx_info["external_data"] = {"file": data.name, "sha256": sha256_file(data), "bytes": data.stat().st_size}
        seconds["total"] = time.perf_counter() - t0
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "model": spec.name,
            "framework": framework,
            "summary": spec.summary,
            "exporter": exported.exporter,
            "fallback_reason": exported.fallback_reason,
            "export_warnings": list(exported.warnings),
            "opset": exported.opset,
            "onnx": onnx_info,
            "weights_bytes": exported.weights_bytes,
            "checkpoint": ckpt,
            "inputs": ins,
            "outputs": outs,
            "tolerances": {
                "defaults": {dt: spec.tolerance(None, dt).to_dict() for dt in ("float32", "float16", "bfloat16", "float64")},
                "per_output": {o["name"]: tol(o["name"], o["dtype"]).to_dict() for o in outs},
                "overrides": {"atol": atol, "rtol": rtol},
            },
            "seed": seed,
            "batch_sizes": sorted({c["batch"] for c in cases}),
            "test_data_sets": sets,
            "parity": {
                "ok": report.ok,
                "reference": report.reference,
                "candidate": report.candidate,
                "report": PARITY_JSON,
                "junit": PARITY_JUNIT,
                "failures": report.failures() if not report.ok else [],
            },
            "onnxruntime": candidate.session_options(),
            "versions": onnx_export.versions(),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "created": _utc_now(),
        }
        atomic.write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n")
        candidate.close()
    return BundleResult(
        model=spec.name,
        framework=framework,
        path=final,
        exporter=exported.exporter,
        fallback_reason=exported.fallback_reason,
        opset=exported.opset,
        onnx_sha256=onnx_sha,
        external_data=exported.external_data,
        checkpoint=ckpt,
        parity=report,
        seconds=seconds,
        warnings=exported.warnings,
    )


# --------------------------------------------------------------------------- verify
def _integrity_check(label: str, reason: str) -> OutputCheck:
    from exporter.parity import OutputCheck

    return OutputCheck(
        output=label, case="integrity", dims={}, shape=None, dtype="bytes", atol=0.0, rtol=0.0, rel_floor=0.0,
        max_abs=None, max_rel=None, mean_abs=None, p99_abs=None, n_bad=0, n_total=0, nan_mismatch=0,
        ok=False, reason=reason,
    )  # fmt: skip


def verify(
    bundle: str | os.PathLike[str],
    runtime: str = "onnxruntime",
    *,
    atol: float | None = None,
    rtol: float | None = None,
    check_hashes: bool = True,
    **runtime_kwargs: Any,
) -> ParityReport:
    """Rerun a bundle's test data in ``runtime`` and compare with the stored framework outputs.

    Uses the tolerances recorded in the manifest (``atol``/``rtol`` override them).  Needs
    only onnx and the runtime: torch and jax are never imported.  With ``check_hashes``, a
    ``model.onnx`` (or external data) whose sha256 differs from the manifest's is a failure.

    Args:
        bundle: the bundle directory (or its model.onnx / manifest.json).
        runtime: ``"onnxruntime"`` (default), ``"reference"`` or ``"node"``.
        atol, rtol: tolerance overrides.
        check_hashes: compare file hashes with the manifest.
        **runtime_kwargs: passed to the runtime (e.g. ``intra_op_threads=1``).

    Returns:
        A ParityReport; ``bool(report)`` is the verdict.

    Raises:
        UsageError: not a bundle, missing files, an unknown runtime.
        MissingDependencyError: the runtime is not installed.
    """
    from exporter import parity
    from exporter.models.registry import DEFAULT_TOLERANCES, Tolerance
    from exporter.runtimes.base import load_runtime

    d = find_bundles(bundle)
    if len(d) != 1:
        raise UsageError(f"{str(bundle)!r} holds {len(d)} bundles; verify them one at a time (the CLI accepts a directory of bundles)")
    root = d[0]
    manifest = read_manifest(root)
    problems = []
    onnx_file = root / str(manifest.get("onnx", {}).get("file", ONNX_FILE))
    if not onnx_file.is_file():
        problems.append(f"{onnx_file.name} is missing")
    sets = manifest.get("test_data_sets") or [{"dir": p.name, "case": p.name, "dims": {}} for p in sorted(root.glob(f"{TEST_DATA_PREFIX}*"))]
    for s in sets:
        if not (root / s["dir"]).is_dir():
            problems.append(f"test data set {s['dir']} is missing")
    if not sets:
        problems.append("no test data sets")
    if problems:
        raise UsageError(format_problems(f"bundle {str(root)!r} is incomplete; re-export it", problems))

    checks: list[OutputCheck] = []
    if check_hashes:
        info = manifest.get("onnx", {})
        files = [(onnx_file, info.get("sha256"))]
        ext = info.get("external_data")
        if ext:
            files.append((root / ext["file"], ext.get("sha256")))
        for f, want in files:
            if not f.is_file():
                checks.append(_integrity_check(f.name, "missing file listed in the manifest"))
                continue
            got = sha256_file(f)
            if want and got != want:
                checks.append(
                    _integrity_check(f.name, f"sha256 {got[:16]}... differs from the manifest's {str(want)[:16]}...: the file changed after export")
                )

    per_output = {k: Tolerance(float(v["atol"]), float(v["rtol"])) for k, v in manifest.get("tolerances", {}).get("per_output", {}).items()}
    defaults = {k: Tolerance(float(v["atol"]), float(v["rtol"])) for k, v in manifest.get("tolerances", {}).get("defaults", {}).items()}

    def tol(output: str, dtype: str) -> Tolerance:
        base = per_output.get(output) or defaults.get(dtype) or DEFAULT_TOLERANCES.get(dtype)
        if base is None:
            raise UsageError(f"bundle {str(root)!r}: no tolerance recorded for output {output!r} ({dtype}); pass atol= and rtol=")
        return Tolerance(base.atol if atol is None else float(atol), base.rtol if rtol is None else float(rtol))

    rt = load_runtime(runtime, str(onnx_file), **runtime_kwargs)
    try:
        for s in sets:
            inputs, expected = read_test_data(root / s["dir"])
            label = str(s.get("case") or s["dir"])
            checks += parity.run_and_compare(rt, inputs, expected, tol, case=label, dims=s.get("dims") or {})
    finally:
        rt.close()
    return parity.ParityReport(
        model=str(manifest.get("model", root.parent.name)),
        framework=str(manifest.get("framework", root.name)),
        reference=f"{manifest.get('framework', 'framework')} (bundle test data)",
        candidate=rt.name,
        checks=tuple(checks),
        seed=manifest.get("seed"),
    )
