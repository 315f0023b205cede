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

import contextlib
import json
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter import atomic
from exporter.errors import ExporterError, ExportError, StateMismatchError, UnknownModelError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from exporter.bundle import BundleResult
    from exporter.divergence import ExplainReport
    from exporter.models.registry import ModelSpec
    from exporter.parity import ParityReport
    from exporter.plan import ExportPlan, StateSource
    from exporter.zoo import ZooReport

__all__ = [
    "FRAMEWORKS",
    "DEFAULT_OUT",
    "ModelInfo",
    "ExportFailure",
    "ExportReport",
    "VerifyReport",
    "ConvertReport",
    "list_models",
    "inspect",
    "plan_export",
    "export",
    "explain",
    "verify",
    "verify_all",
    "report",
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
    family: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_fields: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "frameworks": list(self.frameworks),
            "inputs": [dict(i) for i in self.inputs],
            "outputs": list(self.outputs),
            "dims": dict(self.dims),
            "tolerances": {k: dict(v) for k, v in self.tolerances.items()},
            "family": self.family,
            "config": dict(self.config),
            "config_fields": [dict(f) for f in self.config_fields],
        }

    def family_line(self) -> str | None:
        """``"gpt2: vocab_size*, n_positions*, ..., activation_function=gelu_new (* required)"``
        for a family entry (sized by a config), else None."""
        if not self.config_fields:
            return None
        shown = [f"{f['name']}*" if f["required"] else f"{f['name']}={json.dumps(f['default'])}" for f in self.config_fields]
        return f"{self.name}: {', '.join(shown)}"

    def signature(self) -> str:
        """``"x: float32[batch, 20] -> y"``; per-layer names are folded
        (``past_key_values.<i>.key: float32[...] (i=0..11)``)."""
        ins = _fold([(i["name"], f": {i['dtype']}[{', '.join(map(str, i['shape']))}]") for i in self.inputs])
        return f"{', '.join(ins)} -> {', '.join(_fold([(o, '') for o in self.outputs]))}"


def _fold(entries: list[tuple[str, str]]) -> list[str]:
    """Names that differ only in a ``.<number>.`` part (and have the same type) as one entry."""
    import re

    groups: dict[tuple[str, str], list[int]] = {}
    for name, typ in entries:
        m = re.search(r"\.(\d+)\.", name)
        key = (name[: m.start()] + ".<i>." + name[m.end():], typ) if m else (name, typ)
        groups.setdefault(key, []).append(int(m.group(1)) if m else -1)
    out = []
    for (name, typ), idx in groups.items():
        many = len(idx) > 1 and idx == list(range(idx[0], idx[0] + len(idx)))
        out.append(f"{name}{typ} (i={idx[0]}..{idx[-1]})" if many else f"{name.replace('.<i>.', f'.{idx[0]}.')}{typ}")
    return out


def list_models() -> list[ModelInfo]:
    """Every registered model (builtins, ``EXPORTER_REGISTRY`` modules, entry points), sorted by name.

    Imports neither torch nor jax.
    """
    from exporter.models import family, registry

    out = []
    for spec in registry.specs():
        tols = {o: spec.tolerance(o, "float32").to_dict() for o in spec.outputs}
        fam = family.get_family(spec.name) if family.is_family(spec.name) else None
        out.append(
            ModelInfo(
                name=spec.name,
                summary=spec.summary,
                frameworks=tuple(spec.frameworks),
                inputs=tuple({"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.inputs),
                outputs=tuple(spec.outputs),
                dims=dict(spec.dims),
                tolerances=tols,
                family=getattr(spec, "family", None) or None,
                config=dict(getattr(spec, "config", {}) or {}),
                config_fields=tuple(f.to_dict() for f in fam.fields) if fam is not None else (),
            )
        )
    return out


# --------------------------------------------------------------------------- inspect
def inspect(path: str | os.PathLike[str]) -> Any:
    """Describe a model or a saved state.

    A bundle, a model-zoo directory or an ``.onnx`` file: provenance, verdict, inputs and
    outputs with dims, opset and size (``exporter.modelinfo.inspect_model``).  Anything
    else is a saved state: format, tensors (name, dtype, shape, bytes), total bytes and
    sha256 (``exporter.state.inspect_state``).  Both results have ``lines()`` and ``to_dict()``.

    Raises:
        StateFileError: the state file cannot be read.
        BundleError: an unreadable model, manifest or parity.json.
    """
    from exporter.modelinfo import inspect_model, is_model_path

    if is_model_path(path):
        return inspect_model(path)
    from exporter.state import inspect_state

    return inspect_state(path)


# --------------------------------------------------------------------------- export
@dataclass(frozen=True)
class ExportFailure:
    """A (model, framework) that could not be exported (the typed error, as text).

    ``message`` is the error's (capped) message; ``problems`` its full problem list.
    """

    model: str
    framework: str
    error: str
    message: str
    exit_code: int = 2
    problems: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: str, framework: str, e: ExporterError) -> ExportFailure:
        return cls(model, framework, type(e).__name__, str(e), e.exit_code, tuple(e.problems))

    def line(self) -> str:
        return f"{self.model} ({self.framework}): {self.error}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "framework": self.framework,
            "error": self.error,
            "message": self.message,
            "exit_code": self.exit_code,
            "problems": list(self.problems),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExportFailure:
        """Inverse of :meth:`to_dict`."""
        return cls(d["model"], d["framework"], d["error"], d["message"], int(d.get("exit_code", 2)), tuple(d.get("problems", ())))


@dataclass(frozen=True)
class ExportReport:
    """Every bundle an ``export`` call wrote, and every (model, framework) that failed.

    ``bool(report)`` is True only when something was exported, nothing failed to export,
    and every bundle passed its parity sweep (variants included: a skipped one is no
    failure).  ``to_dict()["results"]`` lists every bundle with its ``variant`` (``"fp32"``
    for the plain export, each variant's result right after its plain bundle).
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
            for v in r.variants:
                lines += [f"{r.model} ({r.framework}, {v.variant}): {f}" for f in v.failures()]
        return lines

    def summary(self) -> str:
        passed = sum(r.ok for r in self.results)
        failed = len(self.results) - passed
        parts = [f"{passed} passed", f"{failed} failed parity"]
        fresh = sum(r.up_to_date for r in self.results)
        if fresh:
            parts.append(f"{fresh} up to date (not rebuilt)")
        if self.errors:
            parts.append(f"{len(self.errors)} could not be exported")
        made = [v for r in self.results for v in r.variants]
        if made:
            count = {s: sum(v.status == s for v in made) for s in ("pass", "fail", "skipped")}
            parts.append(f"variants: {count['pass']} passed, {count['fail']} failed, {count['skipped']} skipped")
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
            "results": [d for r in self.results for d in (r.to_dict(), *(v.to_dict() for v in r.variants))],
            "errors": [e.to_dict() for e in self.errors],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExportReport:
        """Inverse of :meth:`to_dict` (e.g. ``export --json`` output read back)."""
        from dataclasses import replace

        from exporter.bundle import BundleResult
        from exporter.variants import VariantResult

        results: list[BundleResult] = []
        for r in d["results"]:
            if r.get("variant", "fp32") == "fp32":
                results.append(BundleResult.from_dict(r))
            else:  # a variant: listed right after its plain bundle
                results[-1] = replace(results[-1], variants=results[-1].variants + (VariantResult.from_dict(r),))
        return cls(out=Path(d["out"]), results=tuple(results), errors=tuple(ExportFailure.from_dict(e) for e in d["errors"]))

    def to_junit_xml(self) -> str:
        """One ``<testsuites>`` holding every bundle's parity suite and a suite of export errors."""
        reports = [p for r in self.results for p in (r.parity, *(v.parity for v in r.variants if v.parity is not None))]
        return merge_junit(reports, self.errors)


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
        except UnknownModelError as e:
            problems.append(str(e))
    if problems:
        raise UnknownModelError("; ".join(problems))
    return specs


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


def _one_line(e: ExporterError) -> str:
    """An error's message on one line (a listed message's items joined with ``; ``)."""
    head, *items = str(e).split("\n  - ")
    return head + (": " + "; ".join(items) if items else "")


def _raise_collected(errors: Sequence[ExporterError]) -> None:
    """Raise the one error, or all of them as one (their common type, else UsageError)."""
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    kinds = {type(e) for e in errors}
    cls = kinds.pop() if len(kinds) == 1 else UsageError
    raise cls.listing(f"the export request has {len(errors)} problems; nothing was exported", [_one_line(e) for e in errors])


def plan_export(
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
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    variants: str | Sequence[str] | None = None,
    variant_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[ExportPlan]:
    """Validate an export request and plan it: one :class:`~exporter.plan.ExportPlan` per model.

    Every problem is collected before anything is raised; nothing heavy is imported and
    nothing is written.  Arguments as :func:`export`.

    Raises:
        UnknownModelError, UsageError: the problem, or all of them listed in one error.
    """
    from exporter import onnx_export, parity
    from exporter.plan import ExportPlan

    errors: list[ExporterError] = []
    specs: list[ModelSpec] = []
    try:
        specs = _resolve_models(model, all_models)
    except ExporterError as e:
        errors.append(e)
    if checkpoint is not None and len(specs) > 1:
        errors.append(UsageError("--checkpoint holds the state of one model; export one model with it, not several"))
    if config is not None and len(specs) > 1:
        errors.append(UsageError("--config sizes one model family; export one model with it, not several"))
    chosen_variants: tuple[str, ...] = ()
    try:
        from exporter import variants as _variants

        chosen_variants = _variants.check(variants, variant_options)
    except UsageError as e:
        errors.append(e)
    if opset is not None:
        try:
            onnx_export.check_opset(opset)
        except UsageError as e:
            errors.append(e)
    try:
        parity.tolerance_for(None, atol=atol, rtol=rtol)
        tolerances_ok = True
    except UsageError as e:
        errors.append(e)
        tolerances_ok = False
    if framework != "all" and framework not in FRAMEWORKS:
        errors.append(UsageError(f"unknown framework {framework!r}; choose torch, flax or all"))
    if intra_op_threads is not None and (isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int) or intra_op_threads < 1):
        errors.append(UsageError(f"intra_op_threads must be a positive int or None (onnxruntime's default), got {intra_op_threads!r}"))
    user_inputs = None
    if inputs is not None:
        try:
            user_inputs = parity.load_inputs(inputs)
        except UsageError as e:
            errors.append(e)
    if checkpoint is not None and not Path(checkpoint).exists():
        errors.append(
            UsageError(f"checkpoint {str(checkpoint)!r} does not exist; pass a state file or a training checkpoint directory")
        )
    sizes = parity.DEFAULT_BATCH_SIZES if batch_sizes is None else tuple(batch_sizes)
    several = len(specs) > 1
    plans: list[ExportPlan] = []
    for spec in specs:
        try:
            spec, config_record, weights = _family_config(spec, checkpoint, config, len(specs))
            if framework == "all":
                fws = tuple(f for f in FRAMEWORKS if f in spec.frameworks)
            elif several:  # several models: each from the requested build, where it has one
                fws = (framework,) if framework in spec.frameworks else ()
            else:
                spec.factory(framework)  # "model 'x' has no flax build"
                fws = (framework,)
            cases = parity.sweep_cases(spec, sizes, _sweep_dims(spec, dims, several=several))
            runs = parity.plan_runs(
                spec, cases=cases, seed=seed, inputs=user_inputs, inputs_label=None if inputs is None else Path(inputs).name
            )
            tolerance = parity.tolerance_for(spec, atol=atol, rtol=rtol) if tolerances_ok else None
        except ExporterError as e:
            errors.append(e)
            continue
        if fws and tolerance is not None:
            plans.append(
                ExportPlan(
                    spec=spec,
                    frameworks=fws,
                    cases=tuple(cases),
                    runs=tuple(runs),
                    tolerance=tolerance,
                    atol=atol,
                    rtol=rtol,
                    opset=onnx_export.DEFAULT_OPSET if opset is None else opset,
                    seed=seed,
                    external_data=external_data,
                    intra_op_threads=intra_op_threads,
                    out=Path(out),
                    checkpoint=weights if weights is not None else None if checkpoint is None else Path(checkpoint),
                    rename=tuple((str(a), str(b)) for a, b in rename),
                    config=config_record,
                    variants=chosen_variants,
                    variant_options={k: dict(v) for k, v in (variant_options or {}).items()},
                )
            )
    _raise_collected(errors)
    return plans


def _family_config(
    spec: ModelSpec, checkpoint: str | os.PathLike[str] | None, config: Any, n_models: int
) -> tuple[ModelSpec, dict[str, Any] | None, Path | None]:
    """A family's spec sized by its config (``config``, else ``config.json`` beside the
    checkpoint, else the family's default), the record the manifest keeps, and, for a
    Hugging Face model directory given as the checkpoint, its weights file; other models
    as they are (a model that is one config of a family, such as minilm, records that config).

    Raises:
        UsageError: ``config`` for a model that is not a family; an unreadable or invalid config.
    """
    from exporter.models import family

    if family.is_family(spec.name):
        fam = family.get_family(spec.name)
        beside = checkpoint if checkpoint is not None and n_models == 1 and Path(checkpoint).exists() else None
        resolved = fam.resolve(checkpoint=beside, config=config)
        return resolved.spec, resolved.record(), None if beside is None else family.hf_weights(beside)
    if config is not None:
        names = ", ".join(f.name for f in family.families())
        raise UsageError(f"--config sizes a model family ({names}); model {spec.name!r} is not one (its size is fixed)")
    return spec, family.config_record(spec), None


@contextlib.contextmanager
def _state_source(plan: ExportPlan) -> Iterator[StateSource]:
    """The model's state, read, hashed and strictly checked once for all of its bundles.

    With a checkpoint: ``exporter.state.read_state`` (for a training checkpoint directory,
    the step it uses) and ``prepare_state`` (strict, the plan's rename rules).  Without:
    a seeded state saved as ``state.safetensors`` in a scratch directory beside the
    bundles, read back the same way (so the saved-state path always runs); each bundle
    gets a copy of that file.
    """
    from exporter import bundle, rebuild, state
    from exporter.plan import StateSource

    spec = plan.spec
    t = time.perf_counter()
    if plan.checkpoint is not None:
        loaded = state.read_state(plan.checkpoint)
        trained_for = loaded.metadata.get("model")
        if loaded.format == "exporter-checkpoint" and trained_for is not None and trained_for != spec.name:
            raise StateMismatchError(
                f"checkpoint {loaded.path} was trained for model {trained_for!r}, not {spec.name!r}; "
                f"export it as {trained_for!r} or pass a checkpoint of {spec.name!r}"
            )
        canonical, _ = rebuild.prepare_state(spec, loaded.arrays, strict=True, rename=plan.rename, source=str(loaded.path))
        provenance = {"seeded": False, "path": str(loaded.path.resolve()), "format": loaded.format, "sha256": loaded.sha256}
        if plan.rename:  # so that `explain` can rebuild the model from the same file later
            provenance["rename"] = [list(r) for r in plan.rename]
        source = StateSource(canonical, provenance, seconds=time.perf_counter() - t)
        # Only the source may hold the arrays (raw or canonical) while it is in use, so that
        # its release() really frees them: this suspended frame must not.
        del loaded, canonical
        yield source
        return
    with atomic.scratch_dir(plan.out / spec.name) as scratch:
        path = scratch / bundle.STATE_FILE
        seeded = rebuild.init_state(spec, seed=plan.seed, framework=plan.frameworks[0])
        state.save_state(seeded, path, metadata=bundle.state_metadata(spec.name, plan.seed))
        del seeded  # the copy read back from the file is the one used
        loaded = state.read_state(path)
        canonical, _ = rebuild.prepare_state(spec, loaded.arrays, strict=True, source=bundle.STATE_FILE)
        provenance = {"path": bundle.STATE_FILE, "format": loaded.format, "sha256": loaded.sha256, "seeded": True, "seed": plan.seed}
        source = StateSource(canonical, provenance, state_file=path, seconds=time.perf_counter() - t)
        del loaded, canonical
        yield source


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
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    explain_failures: bool = True,
    variants: str | Sequence[str] | None = None,
    variant_options: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
    jobs: int = 1,
) -> ExportReport:
    """Rebuild, export to ONNX and check parity; one bundle per (model, framework) under ``out``.

    Without ``checkpoint`` a seeded initial state is saved into each bundle as
    ``state.safetensors`` and the model is rebuilt from that file (one state per model,
    shared by its torch and flax exports).  With ``checkpoint`` (any format
    ``exporter.state`` reads, including a training checkpoint directory) the state is
    loaded strictly: every missing/unexpected/mismatched key is an error.  Either way the
    state is read once per model, for all of its bundles.

    The whole request is validated first (:func:`plan_export`: every problem listed).
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
        progress: called with one line per bundle started/finished when more than one
            bundle is exported (the CLI prints them to stderr).
        config: the config of a model family (``bert``, ``gpt2``, ``resnet``): a JSON file
            (``--config``) or a mapping; default: ``config.json`` beside ``checkpoint``, else
            the family's default config.  Recorded, with its sha256, in the manifest.
        explain_failures: for a bundle that fails its sweep, run :func:`explain` (which
            module broke) and add its report to the bundle's ``parity.json`` and the result.
        variants: also make these variants of every bundle (``"optimized,fp16,int8"``, any
            subset; default none), each its own bundle ``out/<model>/<framework>-<variant>``
            judged against the framework's outputs (``exporter.variants``).
        variant_options: variant -> options (``{"int8": {"mode": "static"}}``; see each
            ``exporter.variants.<name>.DEFAULT_OPTIONS``).
        force: rebuild every bundle.  By default a bundle that is up to date (made from
            the same checkpoint, model definition, config, options and library versions,
            passing, with its files as written: ``exporter.incremental``) is not rebuilt;
            its result is read back (``BundleResult.up_to_date``).
        jobs: worker processes (default 1: this process).  With more, models are exported
            in parallel, one model per worker at a time; the report's order and exit code
            are a serial run's.  Models registered in ``__main__`` need ``jobs=1``.

    Returns:
        An :class:`ExportReport`; ``bool(report)`` is the verdict.

    Raises:
        UnknownModelError, UsageError, StateFileError, StateMismatchError: bad input.
        ExportError, MissingDependencyError: when a single bundle is exported.
    """
    plans = plan_export(
        model, all_models=all_models, checkpoint=checkpoint, framework=framework, out=out, opset=opset,
        batch_sizes=batch_sizes, dims=dims, rename=rename, atol=atol, rtol=rtol, inputs=inputs, seed=seed,
        external_data=external_data, intra_op_threads=intra_op_threads, config=config,
        variants=variants, variant_options=variant_options,
    )  # fmt: skip
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"jobs must be a positive int (worker processes), got {jobs!r}")
    total = sum(len(p.frameworks) for p in plans)
    single = total == 1
    steps = _Steps(progress if progress is not None and not single else None, total)
    if jobs > 1 and len(plans) > 1:
        request = dict(
            model=model, all_models=all_models, checkpoint=checkpoint, framework=framework, out=out, opset=opset,
            batch_sizes=batch_sizes, dims=dims, rename=rename, atol=atol, rtol=rtol, inputs=inputs, seed=seed,
            external_data=external_data, intra_op_threads=intra_op_threads, config=config,
            variants=variants, variant_options=variant_options,
        )  # fmt: skip
        per_plan = _export_parallel(plans, request, jobs, steps, force=force, explain_failures=explain_failures)
    else:
        per_plan = [_export_plan(p, steps, single=single, force=force, explain_failures=explain_failures) for p in plans]
    results = tuple(r for rs, _ in per_plan for r in rs)
    errors = tuple(e for _, es in per_plan for e in es)
    return ExportReport(out=Path(out), results=results, errors=errors)


class _Steps:
    """Numbered progress lines: ``[k/total] model (framework): exporting ...`` when a bundle
    starts and ``... PASS (2.1 s)`` when it ends (k counts started and finished bundles
    separately, so lines from parallel workers number correctly)."""

    def __init__(self, say: Callable[[str], None] | None, total: int) -> None:
        self.say = say
        self.total = total
        self.started = 0
        self.done = 0

    def start(self, model: str, framework: str, why: Sequence[str] = ()) -> None:
        self.started += 1
        if self.say is not None:
            because = f" ({'; '.join(why)})" if why else ""
            self.say(f"[{self.started}/{self.total}] {model} ({framework}): exporting{because} ...")

    def finish(self, model: str, framework: str, text: str) -> None:
        self.done += 1
        if self.say is not None:
            self.say(f"[{self.done}/{self.total}] {model} ({framework}): {text}")


def _check_plan(plan: ExportPlan, force: bool) -> list[tuple[str, BundleResult | None, tuple[str, ...]]]:
    """``(framework, the bundle read back when it is up to date, why it must be built)``
    for each of the plan's frameworks (``exporter.incremental``)."""
    from exporter import incremental

    checkpoint = None if force else incremental.checkpoint_sha256(plan)
    return [(fw, *incremental.check(plan, fw, checkpoint, force=force)) for fw in plan.frameworks]


def _export_plan(
    plan: ExportPlan,
    steps: _Steps,
    *,
    single: bool,
    force: bool,
    explain_failures: bool,
    checked: Sequence[tuple[str, BundleResult | None, tuple[str, ...]]] | None = None,
) -> tuple[list[BundleResult], list[ExportFailure]]:
    """One model's bundles, in ``plan.frameworks`` order: those up to date read back from
    disk (``exporter.incremental``; ``checked``: already checked), the others built from
    the model's state, read once for all of them."""
    from dataclasses import replace

    from exporter import bundle

    spec = plan.spec
    results: dict[str, BundleResult] = {}
    errors: list[ExportFailure] = []

    def failed(fws: Sequence[str], e: ExporterError) -> None:
        errors.extend(ExportFailure.of(spec.name, fw, e) for fw in fws)
        for fw in fws:
            steps.finish(spec.name, fw, f"ERROR {type(e).__name__}: {str(e).splitlines()[0]}")

    stale: list[tuple[str, tuple[str, ...]]] = []
    try:
        for fw, fresh, why in _check_plan(plan, force) if checked is None else checked:
            if fresh is None:
                stale.append((fw, why))
                continue
            results[fw] = fresh
            steps.started += 1  # one line, when it is done
            steps.finish(spec.name, fw, f"{'PASS' if fresh.ok else 'FAIL'}, up to date ({fresh.seconds['total']:.1f} s)")
        if stale:
            with _state_source(plan) as source, contextlib.ExitStack() as cleanup:
                cleanup.callback(bundle.drop_prefetched, source)
                for i, (fw, why) in enumerate(stale):
                    steps.start(spec.name, fw, why)
                    t = time.perf_counter()
                    try:
                        r = bundle.build(plan, fw, source, release=i + 1 == len(stale))
                    except ExporterError as e:
                        if single:
                            raise
                        failed([fw], e)
                        continue
                    if not r.ok and explain_failures:
                        r = _explain_failure(r, plan)
                    results[fw] = replace(r, rebuilt_because=tuple(why))
                    steps.finish(spec.name, fw, f"{'PASS' if r.ok else 'FAIL'} ({time.perf_counter() - t:.1f} s)")
    except ExporterError as e:  # the state itself: nothing more of this model was exported
        if single or plan.checkpoint is not None:
            raise
        failed([fw for fw in plan.frameworks if fw not in results and not any(f.framework == fw for f in errors)], e)
    return [results[fw] for fw in plan.frameworks if fw in results], errors


# --------------------------------------------------------------------------- parallel export
_WORKER: dict[str, Any] = {}  # in a worker process: its progress queue and the request's plans


def _worker_init(plugins: Sequence[str], queue: Any, threads: int) -> None:
    """A worker's start: its share of the cores for torch and XLA (unless the user set
    them; before either is imported), the user's registry modules, the progress queue."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("EXPORTER_THREADS", str(threads))  # the flax sweep's parallel XLA compiles (runtimes/jax.py)
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} intra_op_parallelism_threads={threads}")
    from exporter.models.registry import load_plugins

    load_plugins(list(plugins))
    _WORKER["queue"] = queue


def _worker_export(request: Mapping[str, Any], index: int, force: bool, explain_failures: bool) -> dict[str, Any]:
    """In a worker: plan the whole request again (the same plans as the parent's: the same
    validation, sweep and seeds) and export plan ``index``; the result as a dict."""
    key = repr(sorted(request.items()))
    if _WORKER.get("key") != key:
        _WORKER["plans"], _WORKER["key"] = plan_export(**request), key
    queue = _WORKER["queue"]
    steps = _Steps(queue.put, 0)
    results, errors = _export_plan(_WORKER["plans"][index], steps, single=False, force=force, explain_failures=explain_failures)
    return ExportReport(out=Path(request["out"]), results=tuple(results), errors=tuple(errors)).to_dict()


_LINE = re.compile(r"^\[\d+/\d+\] (.*) \((torch|flax)\): (.*)$")


def _export_parallel(
    plans: Sequence[ExportPlan], request: Mapping[str, Any], jobs: int, steps: _Steps, *, force: bool, explain_failures: bool
) -> list[tuple[list[BundleResult], list[ExportFailure]]]:
    """:func:`_export_plan` of every plan in ``jobs`` worker processes, results in plan order.

    Workers are spawned (not forked) and take one model at a time, so a worker holds at
    most the two frameworks and one model's weights.  Models whose bundles are all up to
    date are read back here, without a worker; the others go to the workers longest
    first (by the seconds their bundles took last time).  When a worker dies (killed, out
    of memory), the models it may have held are exported again one at a time, each in a
    fresh process: the one that dies again is an ``ExportError`` in the report.
    """
    import concurrent.futures as cf
    import multiprocessing as mp
    import threading

    from exporter import incremental
    from exporter.models import registry

    out: list[tuple[list[BundleResult], list[ExportFailure]] | None] = [None] * len(plans)
    todo = []
    for i, plan in enumerate(plans):
        checked = None if force else _check_plan(plan, force)
        if checked is not None and all(fresh is not None for _, fresh, _ in checked):
            out[i] = _export_plan(plan, steps, single=False, force=False, explain_failures=explain_failures, checked=checked)
        else:
            todo.append(i)
    if not todo:
        return [o for o in out if o is not None]
    in_main = sorted({plans[i].spec.name for i in todo if registry.origin(plans[i].spec.name) == "__main__"})
    if in_main:
        raise UsageError(
            f"jobs={jobs} exports in worker processes, which cannot import models registered in __main__ "
            f"({', '.join(in_main)}); register them in an importable module (--registry MODULE) or use jobs=1"
        )
    todo.sort(key=lambda i: -incremental.previous_seconds(plans[i]))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()

    def relay() -> None:  # the workers' progress lines, numbered here
        while (line := queue.get()) is not None:
            m = _LINE.match(line)
            if m is None:
                continue
            name, fw, text = m.groups()
            if text.startswith("exporting"):
                why = text[len("exporting (") : -len(") ...")] if text.startswith("exporting (") else ""
                steps.start(name, fw, [why] if why else [])
            else:
                steps.finish(name, fw, text)

    def run(indexes: Sequence[int], workers: int) -> list[int]:
        """Export ``indexes`` in one pool; those whose worker pool broke are returned."""
        broken = []
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(plugins, queue, threads)) as pool:
            futures = {pool.submit(_worker_export, request, i, force, explain_failures): i for i in indexes}
            for fut in cf.as_completed(futures):
                try:
                    got = ExportReport.from_dict(fut.result())
                except cf.process.BrokenProcessPool:
                    broken.append(futures[fut])
                    continue
                out[futures[fut]] = (list(got.results), list(got.errors))
        return broken

    plugins = registry.plugins()
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // jobs)
    reader = threading.Thread(target=relay, name="exporter-progress", daemon=True)
    reader.start()
    try:
        for i in run(todo, min(jobs, len(todo))):
            if run([i], 1):
                name = plans[i].spec.name
                died = ExportError(f"model {name!r}: its worker process died while exporting it (killed, or out of memory?); rerun it alone")
                out[i] = ([], [ExportFailure.of(name, fw, died) for fw in plans[i].frameworks])
                for fw in plans[i].frameworks:
                    steps.finish(name, fw, f"ERROR ExportError: {died}")
    finally:
        queue.put(None)
        reader.join(timeout=10)
    return [o if o is not None else ([], []) for o in out]


def _explain_failure(r: BundleResult, plan: ExportPlan) -> BundleResult:
    """:func:`explain` a bundle that failed its sweep: the report goes into its ``parity.json``
    (key ``"explain"``) and into the result.  The explanation is extra: if it cannot be made,
    the export's verdict stands and a warning says why."""
    from dataclasses import replace

    from exporter import bundle

    try:
        report = explain(r.path, rename=plan.rename, intra_op_threads=plan.intra_op_threads)
    except ExporterError as e:
        return replace(r, warnings=(*r.warnings, f"explain failed: {type(e).__name__}: {str(e).splitlines()[0]}"))
    path = r.path / bundle.PARITY_JSON
    data = json.loads(path.read_text(encoding="utf-8"))
    data["explain"] = report.to_dict()
    atomic.write_text(path, json.dumps(data, indent=2, allow_nan=False))
    return replace(r, explain=report)


# --------------------------------------------------------------------------- explain
def explain(
    bundle: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    runtime: str = "onnxruntime",
    rename: Sequence[tuple[str, str]] = (),
    cases: Sequence[str] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    relevant_only: bool = True,
    intra_op_threads: int | None = None,
) -> ExplainReport:
    """Which module of a bundle's model broke: the first one whose ONNX output leaves tolerance.

    Rebuilds the framework model from the bundle's state (``checkpoint`` or the path in the
    manifest when the bundle holds none; its sha256 must match the manifest's), runs every
    test data set with every submodule's output captured, and compares each with the
    matching value of a copy of the ONNX graph (``exporter.divergence``).

    Args:
        bundle: the bundle directory ``OUT/<model>/<framework>``.
        checkpoint: the state the bundle was exported from (default: the manifest's).
        runtime: ``"onnxruntime"`` (the copy runs unoptimised, so every value exists) or
            ``"reference"`` (``onnx.reference``).
        rename: ``--rename`` rules of the export, for bundles whose manifest does not record them.
        cases: labels of the test data sets to run (``"batch=2,seq=16"``); default: all.
        atol, rtol: tolerance overrides (default: the manifest's).
        relevant_only: compare only the elements that reach the outputs (default); False: all.
        intra_op_threads: onnxruntime threads (None = its default).

    Returns:
        An :class:`exporter.divergence.ExplainReport`; ``bool(report)`` is True when no
        module diverges and the outputs pass.

    Raises:
        BundleError: not a bundle / incomplete.
        UsageError: several bundles, unknown runtime or case, no state to rebuild from.
        UnknownModelError: the bundle's model is not registered (``--registry``).
        StateMismatchError: the state's sha256 is not the manifest's.
        StateFileError, MissingDependencyError: unreadable state / the framework is missing.
    """
    from exporter import bundle as _bundle
    from exporter import divergence

    found = _bundle.find_bundles(bundle)
    if len(found) != 1:
        raise UsageError(f"{str(bundle)!r} holds {len(found)} bundles; explain them one at a time")
    root = found[0]
    manifest = _bundle.read_manifest(root)
    return divergence.explain_bundle(
        root, manifest, recorded=_bundle.recorded_tolerances(manifest, root), checkpoint=checkpoint, runtime=runtime,
        rename=rename, cases=cases, atol=atol, rtol=rtol, relevant_only=relevant_only, intra_op_threads=intra_op_threads,
    )  # fmt: skip


# --------------------------------------------------------------------------- verify
def verify(
    bundle: str | os.PathLike[str],
    runtime: str = "onnxruntime",
    *,
    atol: float | None = None,
    rtol: float | None = None,
    check_hashes: bool = True,
    runtime_options: Mapping[str, Any] | None = None,
    **runtime_kwargs: Any,
) -> ParityReport:
    """Rerun a bundle's test data (``exporter.bundle.verify``); needs only onnx + the runtime.

    Args:
        bundle: the bundle directory ``OUT/<model>/<framework>``.
        runtime: a name in ``exporter.runtimes.base.RUNTIMES`` (``onnxruntime``, ``reference``,
            ``node``, ``openvino``, ``browser``).
        atol, rtol: override the manifest's tolerances.
        check_hashes: fail when model.onnx's sha256 differs from the manifest's.
        runtime_options: runtime options (``--runtime-option KEY=VALUE``), recorded in the
            report's ``settings`` (``openvino``: ``{"INFERENCE_PRECISION_HINT": "f32"}``).
        **runtime_kwargs: passed to the runtime.

    Returns:
        A ParityReport; ``bool(report)`` is the verdict.

    Raises:
        BundleError: not a bundle / incomplete / corrupt.
        UsageError: unknown runtime, bad tolerances.
        MissingDependencyError: the runtime is not installed.
    """
    from exporter import bundle as _bundle

    return _bundle.verify(
        bundle, runtime, atol=atol, rtol=rtol, check_hashes=check_hashes, options=runtime_options, **runtime_kwargs
    )


@dataclass(frozen=True)
class VerifyReport:
    """Every bundle a ``verify_all`` call checked, with its ParityReport (``exporter verify``),
    and every model-zoo directory (no manifest) with its ``exporter.zoo.ZooReport``."""

    bundles: tuple[Path, ...]
    reports: tuple[ParityReport, ...]
    zoo: tuple[ZooReport, ...] = ()

    @property
    def ok(self) -> bool:
        return bool(self.reports or self.zoo) and all(r.ok for r in self.reports) and all(z.ok for z in self.zoo)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def exit_code(self) -> int:
        """0 everything passes, 1 a failure, 2 a model-zoo directory the runtime could not load or run."""
        if any(z.exit_code == 2 for z in self.zoo):
            return 2
        return 0 if self.ok else 1

    def table(self) -> str:
        """Per bundle: its path, its parity table and, when it fails, its failures; per model-zoo
        directory its summary, table and failures."""
        blocks = []
        for p, r in zip(self.bundles, self.reports):
            text = f"{p}\n{r.table()}"
            if not r.ok:
                text += "\nfailures:" + "".join(f"\n  - {line}" for line in r.failures())
            blocks.append(text)
        for z in self.zoo:
            text = z.summary() + ("\n" + z.parity.table() if z.parity.checks else "")
            if not z.ok:
                text += "\nfailures:" + "".join(f"\n  - {line}" for line in z.failures())
            blocks.append(text)
        return "\n".join(blocks)

    def to_dict(self) -> Any:
        """One bundle: its report's dict; several: a list of them (model-zoo directories as zoo reports)."""
        dicts = [r.to_dict() for r in self.reports] + [z.to_dict() for z in self.zoo]
        return dicts[0] if len(dicts) == 1 else dicts

    def to_junit_xml(self) -> str:
        return merge_junit([*self.reports, *(z.parity for z in self.zoo)])


def verify_all(
    bundles: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    runtime: str = "onnxruntime",
    *,
    atol: float | None = None,
    rtol: float | None = None,
    check_hashes: bool = True,
    runtime_options: Mapping[str, Any] | None = None,
    **runtime_kwargs: Any,
) -> VerifyReport:
    """:func:`verify` every bundle at or below each path (an export's OUT directory holds several).

    A path without exporter bundles that is (or holds) ONNX model-zoo directories
    (``model.onnx`` + ``test_data_set_<k>/``, no manifest) is verified by
    ``exporter.zoo.verify_dir`` with dtype-aware default tolerances.

    Raises:
        As :func:`verify`.
    """
    from exporter import bundle as _bundle
    from exporter import zoo as _zoo
    from exporter.errors import BundleError

    paths = [bundles] if isinstance(bundles, (str, os.PathLike)) else list(bundles)
    found: list[Path] = []
    zoo_dirs: list[Path] = []
    for b in paths:
        if _zoo.is_zoo_dir(b):
            zoo_dirs.append(Path(b))
            continue
        try:
            found += _bundle.find_bundles(b)
        except BundleError:
            if not Path(b).is_dir():
                raise
            try:
                zoo_dirs += _zoo.find_zoo_dirs(b)
            except UsageError:
                raise BundleError(
                    f"{str(b)!r} holds no exporter bundle (manifest.json) and no model-zoo directory "
                    "(model.onnx beside test_data_set_<k>/); pass OUT/<model>/<framework> written by `exporter export`"
                ) from None
    found = list(dict.fromkeys(found))
    reports = [
        _bundle.verify(p, runtime, atol=atol, rtol=rtol, check_hashes=check_hashes, options=runtime_options, **runtime_kwargs)
        for p in found
    ]
    zoo_reports = [
        _zoo.verify_dir(d, runtime, atol=atol, rtol=rtol, **({"options": dict(runtime_options)} if runtime_options else {}), **runtime_kwargs)
        for d in dict.fromkeys(zoo_dirs)
    ]
    return VerifyReport(bundles=tuple(found), reports=tuple(reports), zoo=tuple(zoo_reports))


# --------------------------------------------------------------------------- report
def report(out_dir: str | os.PathLike[str], html: str | os.PathLike[str] | None = None) -> Any:
    """The report over every bundle under ``out_dir`` (``exporter.report.report``); with ``html``
    also the self-contained HTML file.  Returns an ``exporter.report.Report``.

    Raises:
        BundleError: no bundle under ``out_dir``, or unreadable bundle files.
    """
    from exporter.report import report as _report

    return _report(out_dir, html=html)


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
    loaded = state.read_state(src_p)
    src_format, raw = loaded.format, loaded.arrays
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
        **kwargs: ``every``, ``keep``, ``keep_every``, ``framework``, ``seed``, ``nproc`` and
            ``strategy`` (torch ranks), ``devices`` (flax devices), ... (see ``exporter.training.train``).

    Returns:
        The ``TrainResult``.
    """
    from exporter.training import train as _train

    return _train(model, ckpt_dir, steps, **kwargs)
