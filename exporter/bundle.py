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
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter import atomic, generation, provenance, testdata
from exporter.errors import BundleError, ExportError, RunError, UsageError
from exporter.hashing import sha256_file  # also reachable as bundle.sha256_file (tests/test_node.py uses it)

if TYPE_CHECKING:  # pragma: no cover
    from exporter.divergence import ExplainReport
    from exporter.models.registry import ModelSpec, Tolerance
    from exporter.onnx_export import OnnxExport
    from exporter.parity import OutputCheck, ParityReport
    from exporter.plan import ExportPlan, StateSource
    from exporter.runtimes.base import Runtime
    from exporter.variants import VariantResult

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
    "recorded_tolerances",
    "state_metadata",
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
RECORDED_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def state_metadata(model: str, seed: int) -> dict[str, str]:
    """The ``__metadata__`` of a bundle's seeded ``state.safetensors``.

    One key only: safetensors writes ``__metadata__`` from a Rust HashMap, so with several
    keys their order (and the file's sha256) changes from run to run.
    """
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
        explain: for a bundle that fails, which module broke (``exporter.divergence``).
        variant: ``"fp32"``: the plain export (its variants are in ``variants``).
        variants: the optimized / fp16 / int8 bundles made of it (``exporter.variants``);
            ``to_dict`` leaves them out: ``ExportReport`` lists each as a result of its own.
        up_to_date: the bundle on disk was made from the same inputs and its files verify,
            so it was not rebuilt (``exporter.incremental``); ``seconds`` is the check's.
        rebuilt_because: why it was (re)built: no bundle yet, what changed, ``--force``.
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
    explain: ExplainReport | None = None
    variant: str = "fp32"
    variants: tuple[VariantResult, ...] = ()
    up_to_date: bool = False
    rebuilt_because: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """The plain export passes and no variant of it fails (a skipped one is no failure)."""
        return self.parity.ok and all(v.ok for v in self.variants)

    def __bool__(self) -> bool:
        return self.ok

    def headline(self) -> str:
        """``"mlp (torch): PASS -> out/mlp/torch  [torch.onnx.dynamo, opset 20, 3.2 s]"``."""
        verdict = ("PASS" if self.ok else "FAIL") + (" (up to date, not rebuilt)" if self.up_to_date else "")
        extra = f", fallback: {self.fallback_reason}" if self.fallback_reason else ""
        return (
            f"{self.model} ({self.framework}): {verdict} -> {self.path}  "
            f"[{self.exporter}, opset {self.opset}{extra}, {self.seconds.get('total', 0.0):.1f} s]"
        )

    def table(self) -> str:
        """The headline, export warnings and the parity table."""
        warn = "".join(f"\n  warning: {w}" for w in self.warnings)
        explained = "" if self.explain is None else "\n" + self.explain.table()
        return self.headline() + warn + "\n" + self.parity.table() + explained + "".join(f"\n{v.table()}" for v in self.variants)

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
            "variant": self.variant,
            "up_to_date": self.up_to_date,
            "rebuilt_because": list(self.rebuilt_because),
            "parity": self.parity.to_dict(),
            "explain": None if self.explain is None else self.explain.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BundleResult:
        """Inverse of :meth:`to_dict` (e.g. a result read back from ``export --json``)."""
        from exporter.divergence import ExplainReport
        from exporter.parity import ParityReport

        return cls(
            model=d["model"],
            framework=d["framework"],
            path=Path(d["path"]),
            exporter=d["exporter"],
            fallback_reason=d["fallback_reason"],
            opset=int(d["opset"]),
            onnx_sha256=d["onnx_sha256"],
            external_data=bool(d["external_data"]),
            checkpoint=dict(d["checkpoint"]),
            parity=ParityReport.from_dict(d["parity"]),
            seconds={k: float(v) for k, v in d.get("seconds", {}).items()},
            warnings=tuple(d.get("warnings", ())),
            explain=None if d.get("explain") is None else ExplainReport.from_dict(d["explain"]),
            up_to_date=bool(d.get("up_to_date", False)),
            rebuilt_because=tuple(d.get("rebuilt_because", ())),
        )


# --------------------------------------------------------------------------- manifest
def read_manifest(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a bundle directory.

    Raises:
        BundleError: not a directory, no manifest, unreadable or not an exporter bundle.
    """
    d = Path(bundle)
    if not d.is_dir():
        raise BundleError(f"bundle {str(d)!r} is not a directory; pass OUT/<model>/<framework> written by `exporter export`")
    path = d / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{str(d)!r} is not an exporter bundle: {MANIFEST} is missing; pass OUT/<model>/<framework> written by `exporter export`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} cannot be read as JSON ({e}); re-export the bundle") from e
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path} is not an exporter bundle manifest (format {got!r}, expected {BUNDLE_FORMAT!r})")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int):
        raise BundleError(f"{path} has format_version {version!r}, expected an integer; re-export the bundle")
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {version}, newer than this exporter reads ({BUNDLE_FORMAT_VERSION}); upgrade exporter"
        )
    return manifest


def find_bundles(path: str | os.PathLike[str]) -> list[Path]:
    """Bundle directories at or below ``path``: itself when it holds a manifest, else
    ``*/manifest.json`` and ``*/*/manifest.json`` (an export's OUT directory), sorted.

    Raises:
        BundleError: ``path`` does not exist or holds no bundle.
    """
    p = Path(path)
    if p.is_file() and p.name in (ONNX_FILE, MANIFEST):
        p = p.parent
    if not p.exists():
        raise BundleError(f"bundle {str(p)!r} does not exist; pass a directory written by `exporter export`")
    if (p / MANIFEST).is_file() or not p.is_dir():
        return [p]
    found = sorted({m.parent for pattern in (f"*/{MANIFEST}", f"*/*/{MANIFEST}") for m in p.glob(pattern)})
    if not found:
        raise BundleError(
            f"{str(p)!r} holds no exporter bundle ({MANIFEST} not found in it or two levels below); "
            "pass OUT/<model>/<framework> written by `exporter export`"
        )
    return found


# --------------------------------------------------------------------------- build
_COLLECT_ABOVE = 256 << 20  # bytes of weights above which the framework's copy is collected before onnxruntime loads


def _framework_model(spec: ModelSpec, framework: str, canonical: Mapping[str, np.ndarray]) -> tuple[Any, Runtime]:
    """The framework build of ``spec`` from ``canonical`` (module or variables) and its runtime."""
    from exporter import rebuild

    if framework == "torch":
        from exporter.runtimes.torch import TorchRuntime

        module = rebuild.torch_module(spec, canonical)
        return module, TorchRuntime.from_module(spec, module)
    assert framework == "flax", framework
    from exporter.runtimes.jax import JaxRuntime

    variables = rebuild.flax_variables(spec, canonical)
    return variables, JaxRuntime.from_variables(spec, variables)


# The flax reference of a model, built and lowered while its torch bundle runs and compiled
# in background threads during the torch export (torch.export is single-threaded Python;
# XLA compiles release the GIL), then taken by the flax bundle of the same plan and source.
# Only for weights up to _COLLECT_ABOVE (the flax copy of the weights is held meanwhile).
_PREFETCH: dict[int, tuple[Any, Any, tuple[Any, Runtime]]] = {}


def _prefetch_flax(plan: ExportPlan, source: StateSource) -> None:
    """Build the flax reference and start the compiles of its sweep (not waited for).  Any
    failure is left to the flax bundle, which builds it again and reports it there."""
    try:
        built, reference = _framework_model(plan.spec, "flax", source.canonical)
        reference.prepare([feed for _label, _dims, feed in plan.runs], wait=False)
    except Exception:  # noqa: BLE001 - reported by the flax bundle itself (same call, same error)
        return
    _PREFETCH[id(source)] = (plan, source, (built, reference))


def drop_prefetched(source: StateSource) -> None:
    """Forget a flax reference prefetched for ``source`` that no bundle took (its flax
    bundle was not built: the model's export stopped early)."""
    entry = _PREFETCH.pop(id(source), None)
    if entry is not None:
        entry[2][1].close()


def _flax_model(plan: ExportPlan, source: StateSource) -> tuple[Any, Runtime]:
    """The prefetched flax build of this plan and source, else built now."""
    entry = _PREFETCH.pop(id(source), None)
    if entry is not None and entry[0] is plan and entry[1] is source:
        return entry[2]
    return _framework_model(plan.spec, "flax", source.canonical)


def _load_export(path: Path, plan: ExportPlan, exported: OnnxExport) -> Runtime:
    """onnxruntime on the model just exported; a file it cannot load is an export failure."""
    from exporter.runtimes.onnxruntime import OnnxRuntime

    try:
        # Prepacking only for inline weights: the adapter's own rule, decided here from the
        # export instead of parsing model.onnx again.
        return OnnxRuntime(path, intra_op_threads=plan.intra_op_threads, prepacking=not exported.external_data)
    except (RunError, UsageError) as e:
        raise ExportError(
            f"model {plan.spec.name!r}: onnxruntime cannot load the {path.name} that {exported.exporter} just wrote: {e}"
        ) from e


def build(plan: ExportPlan, framework: str, source: StateSource, *, release: bool = False) -> BundleResult:
    """Export one model from one framework into a bundle and run the parity sweep.

    ``plan`` and ``source`` were validated by ``exporter.api.export``; nothing is checked
    again here.  The steps, inside a temp directory that is renamed to
    ``plan.bundle_dir(framework)`` only when all files are written:

    1. the seeded ``state.safetensors`` (``source.state_file``) is copied in, when there is one;
    2. rebuild the framework model from ``source.canonical`` and run it on every case of
       ``plan.runs`` (the reference outputs: test data, and the dtypes of the recorded
       tolerances);
    3. export to ONNX (``exporter.onnx_export``), provenance in ``metadata_props``;
    4. free the framework's copy of the weights (and, with ``release``, the source's),
       load the export in onnxruntime and compare every case (``exporter.parity``);
    5. write test data sets, parity.json, parity.junit.xml, manifest.json (plain writes:
       the directory is fsynced once when it is published).

    A failing sweep still publishes the bundle (its reports say why); the verdict is in
    the result.

    Args:
        plan: the model's export plan.
        framework: one of ``plan.frameworks``.
        source: the model's state.
        release: this is the source's last user: release its arrays before onnxruntime
            loads its own copy of the weights (peak memory about 1x the weights).

    Returns:
        The :class:`BundleResult`.

    Raises:
        ExportError: the export failed, or onnxruntime cannot load it.
        RunError: the framework itself failed to run a case.
        MissingDependencyError: the framework or exporter is not installed.
    """
    from exporter import onnx_export, parity

    spec = plan.spec
    final = plan.bundle_dir(framework)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {"state": source.seconds}
    ckpt = dict(source.provenance)
    with atomic.atomic_dir(final) as tmp:
        if source.state_file is not None:
            shutil.copyfile(source.state_file, tmp / STATE_FILE)

        # 1. rebuild; the reference outputs of every case
        t = time.perf_counter()
        if framework == "flax":
            built, reference = _flax_model(plan, source)
        else:
            built, reference = _framework_model(spec, framework, source.canonical)
        reference.prepare([feed for _label, _dims, feed in plan.runs])  # jax: the sweep's compiles, in parallel
        expected = [reference.run(feed) for _label, _dims, feed in plan.runs]
        # a decoder: the reference's greedy runs for generation parity (exporter.generation)
        gen = generation.bundle_stage(spec, reference, plan.tolerance, plan.seed)
        seconds["reference"] = time.perf_counter() - t
        # The flax bundle of this source comes next: build its reference now and compile it while
        # torch exports (after the torch reference runs: XLA threads beside torch's OpenMP ones
        # slow both; the Python part here, not in a thread beside torch.export's Python).
        if framework == "torch" and not release and "flax" in plan.frameworks and (os.cpu_count() or 1) > 1 \
                and sum(int(a.nbytes) for a in source.canonical.values()) <= _COLLECT_ABOVE:
            _prefetch_flax(plan, source)
        out_dtypes = {o: str(expected[0][o].dtype) for o in spec.outputs}
        per_output = {o: plan.tolerance(o, dt).to_dict() for o, dt in out_dtypes.items()}

        # 2. export
        t = time.perf_counter()
        metadata = {
            "model": spec.name,
            "framework": framework,
            "checkpoint_path": str(ckpt.get("path", "")),
            "checkpoint_format": str(ckpt.get("format", "")),
            "checkpoint_sha256": str(ckpt.get("sha256", "")),
            "opset": str(plan.opset),
            "tolerances": per_output,
            "versions": onnx_export.versions(),
        }
        onnx_path = tmp / ONNX_FILE
        exported = onnx_export.export_model(
            spec, framework, built, onnx_path, opset=plan.opset, external_data=plan.external_data, metadata=metadata
        )
        seconds["export"] = time.perf_counter() - t
        if exported.log:
            (tmp / EXPORT_LOG).write_text(exported.log, encoding="utf-8")

        # 3. free the framework's weights (and the source's, when this is its last user)
        # before onnxruntime loads its copy: peak memory about 1x the weights, not 2x.
        reference_name = reference.name
        reference.close()
        del reference, built
        if release:
            source.release()
        if exported.weights_bytes >= _COLLECT_ABOVE:  # a full collection costs ~0.2 s; worth it only for big weights
            gc.collect()

        # 4. onnxruntime against the framework
        t = time.perf_counter()
        candidate = _load_export(onnx_path, plan, exported)
        report = parity.check_runs(
            spec, plan.runs, expected, candidate, tolerance=plan.tolerance, reference=reference_name, seed=plan.seed,
            framework=framework,
        )  # fmt: skip
        if gen is not None:
            report = replace(report, checks=report.checks + tuple(gen.check(candidate).checks()))
        session = candidate.session_options()
        candidate.close()
        seconds["parity"] = time.perf_counter() - t

        # 5. files
        sets = []
        for k, ((label, dims, feed), out) in enumerate(zip(plan.runs, expected)):
            name = f"{TEST_DATA_PREFIX}{k}"
            testdata.write_test_data(tmp / name, {t.name: feed[t.name] for t in spec.inputs}, {o: out[o] for o in spec.outputs})
            sets.append({"dir": name, "case": label, "dims": dict(dims)})
        extra: dict[str, Any] = {}
        if gen is not None:
            extra[generation.MANIFEST_KEY] = gen.write(tmp)
        if plan.config is not None:
            extra["config"] = dict(plan.config)
        (tmp / PARITY_JSON).write_text(report.to_json(), encoding="utf-8")
        (tmp / PARITY_JUNIT).write_text(report.to_junit_xml(), encoding="utf-8")
        files = provenance.file_table(tmp)  # every file but the manifest (incremental exports check them)
        onnx_sha = files[ONNX_FILE]["sha256"]
        onnx_info: dict[str, Any] = {"file": ONNX_FILE, "sha256": onnx_sha, "bytes": files[ONNX_FILE]["bytes"], "external_data": None}
        if exported.external_data:
            data = onnx_export.EXTERNAL_DATA_NAME
            onnx_info["external_data"] = {"file": data, "sha256": files[data]["sha256"], "bytes": files[data]["bytes"]}
        ckpt_sha = None if ckpt.get("seeded") else str(ckpt["sha256"])
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
            "inputs": [{"name": t.name, "dtype": str(np.dtype(t.dtype)), "shape": list(t.shape)} for t in spec.inputs],
            "outputs": [{"name": o, "dtype": out_dtypes[o], "shape": exported.output_dims.get(o)} for o in spec.outputs],
            "tolerances": {
                "defaults": {dt: spec.tolerance(None, dt).to_dict() for dt in RECORDED_DTYPES},
                "per_output": per_output,
                "overrides": {"atol": plan.atol, "rtol": plan.rtol},
            },
            "seed": plan.seed,
            "batch_sizes": plan.batch_sizes,
            "test_data_sets": sets,
            "variant": "fp32",
            **extra,
            "parity": {
                "ok": report.ok,
                "reference": report.reference,
                "candidate": report.candidate,
                "report": PARITY_JSON,
                "junit": PARITY_JUNIT,
                "failures": report.failures() if not report.ok else [],
            },
            "onnxruntime": session,
            "versions": metadata["versions"],
            provenance.RECORD_KEY: provenance.record(plan, framework, ckpt_sha),
            provenance.FILES_KEY: files,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "created": _utc_now(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")
    made: tuple[VariantResult, ...] = ()
    if plan.variants:  # judged against `expected`, the framework's outputs (exporter.variants.publish)
        from exporter.variants.publish import build_variants

        made = build_variants(plan, framework, final, expected, reference=reference_name, checkpoint_sha256=ckpt_sha)
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
        variants=made,
    )


# --------------------------------------------------------------------------- verify
def _integrity_check(label: str, reason: str) -> OutputCheck:
    from exporter.parity import OutputCheck

    return OutputCheck(
        output=label, case="integrity", dims={}, shape=None, dtype="bytes", atol=0.0, rtol=0.0, rel_floor=0.0,
        max_abs=None, max_rel=None, mean_abs=None, p99_abs=None, n_bad=0, n_total=0, nan_mismatch=0,
        ok=False, reason=reason,
    )  # fmt: skip


def recorded_tolerances(manifest: Mapping[str, Any], root: Path) -> dict[str, dict[str, Tolerance]]:
    """The manifest's ``tolerances`` table as Tolerance values (for ``parity.tolerance_for``).

    Raises:
        BundleError: a recorded tolerance that is not ``{"atol": x, "rtol": y}`` with numbers >= 0.
    """
    from exporter.models.registry import Tolerance

    table = manifest.get("tolerances")
    table = table if isinstance(table, Mapping) else {}
    out: dict[str, dict[str, Tolerance]] = {}
    problems = []
    for part in ("per_output", "defaults"):
        entries = table.get(part)
        entries = entries if isinstance(entries, Mapping) else {}
        out[part] = {}
        for key, value in entries.items():
            try:
                tol = Tolerance(float(value["atol"]), float(value["rtol"]))
            except (TypeError, KeyError, ValueError):
                problems.append(f"tolerances.{part}.{key} is {value!r}, expected {{'atol': x, 'rtol': y}}")
                continue
            if not (np.isfinite(tol.atol) and np.isfinite(tol.rtol) and tol.atol >= 0 and tol.rtol >= 0):
                problems.append(f"tolerances.{part}.{key} is {value!r}: atol and rtol must be finite numbers >= 0")
                continue
            out[part][str(key)] = tol
    if problems:
        raise BundleError.listing(f"bundle {str(root)!r}: the manifest's tolerances are malformed; re-export the bundle", problems)
    return out


def verify(
    bundle: str | os.PathLike[str],
    runtime: str = "onnxruntime",
    *,
    atol: float | None = None,
    rtol: float | None = None,
    check_hashes: bool = True,
    options: Mapping[str, Any] | None = None,
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
        options: runtime options (CLI ``--runtime-option KEY=VALUE``), for runtimes that
            take them (``openvino``: ``{"INFERENCE_PRECISION_HINT": "f32"}``).
        **runtime_kwargs: passed to the runtime (e.g. ``intra_op_threads=1``).

    Returns:
        A ParityReport; ``bool(report)`` is the verdict.  It records the runtime's settings
        (``settings``) and, when checks fail, the runtime's own hints (``hints``).

    Raises:
        BundleError: not a bundle, missing files or test data, a malformed manifest.
        UsageError: several bundles under ``bundle``, an unknown runtime, bad tolerances.
        MissingDependencyError: the runtime is not installed.
    """
    from exporter import parity
    from exporter.runtimes.base import load_runtime, runtime_class

    d = find_bundles(bundle)
    if len(d) != 1:
        raise UsageError(f"{str(bundle)!r} holds {len(d)} bundles; verify them one at a time (the CLI accepts a directory of bundles)")
    root = d[0]
    manifest = read_manifest(root)
    tol = parity.tolerance_for(None, atol=atol, rtol=rtol, recorded=recorded_tolerances(manifest, root))
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
        raise BundleError.listing(f"bundle {str(root)!r} is incomplete; re-export it", problems)

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

    if options:
        import inspect

        if "options" not in inspect.signature(runtime_class(runtime).__init__).parameters:
            raise UsageError(f"runtime {runtime!r} takes no runtime options (got {dict(options)}); the openvino runtime does")
        runtime_kwargs["options"] = dict(options)
    rt = load_runtime(runtime, str(onnx_file), **runtime_kwargs)
    try:
        for s in sets:
            inputs, expected = testdata.read_test_data(root / s["dir"])
            label = str(s.get("case") or s["dir"])
            checks += parity.run_and_compare(rt, inputs, expected, tol, case=label, dims=s.get("dims") or {})
        replayed = generation.verify_bundle(root, manifest, rt, tol)
        if replayed is not None:
            checks += replayed.checks()
        if manifest.get("variant") not in (None, "fp32"):  # task metrics decide (exporter.variants.publish)
            from exporter.variants.publish import variant_checks

            checks = variant_checks(root, manifest, rt, sets, checks) or checks
        failed = [c for c in checks if not c.ok]
        hints = tuple(rt.failure_hints(failed)) if failed else ()
        session_options = getattr(rt, "session_options", None)
        settings = dict(session_options()) if session_options is not None else {}
    finally:
        rt.close()
    return parity.ParityReport(
        model=str(manifest.get("model", root.parent.name)),
        framework=str(manifest.get("framework", root.name)),
        reference=f"{manifest.get('framework', 'framework')} (bundle test data)",
        candidate=rt.name,
        checks=tuple(checks),
        seed=manifest.get("seed"),
        hints=hints,
        settings=settings,
    )
