"""The shared model registry: one frozen ``ModelSpec`` per architecture.

A spec names a torch build and a flax build of the *same* architecture, the example-input
spec (names, dtypes, shapes with named dynamic dims), the layout rules that map canonical
(torch-style dotted) parameter names to flax variables, and the default tolerances.

Builds are factories that import torch / flax lazily, so importing the registry is cheap.

A spec checks itself when it is made: a user-written spec with a bad name, shape, dtype,
tolerance, regex or layout raises ``UsageError`` listing every problem at once.

Users register their own architectures from their own module::

    from exporter.models.registry import ModelSpec, TensorSpec, register
    register(ModelSpec(name="mine", ...))

and point exporter at it with ``python -m exporter --registry my_pkg.my_models ...`` or the
``EXPORTER_REGISTRY`` environment variable (comma-separated module paths), or an
``exporter.models`` entry point in their package metadata.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from exporter import dimexpr, layouts
from exporter.errors import MAX_LISTED, UnknownModelError, UsageError
from exporter.layouts import Rule

__all__ = [
    "TensorSpec",
    "Tolerance",
    "ModelSpec",
    "DEFAULT_TOLERANCES",
    "register",
    "unregister",
    "get",
    "names",
    "specs",
    "load_plugins",
]


@dataclass(frozen=True)
class TensorSpec:
    """One model input.

    ``shape`` entries are ints (static) or names of dynamic dims (``"batch"``, ``"seq"``).
    Seeded example values are drawn uniformly from ``[low, high)`` (integers for int dtypes).
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise UsageError.listing(f"bad input spec {self.name!r}", problems)

    def problems(self) -> list[str]:
        """What is wrong with this input spec (empty: nothing)."""
        out: list[str] = []
        if not isinstance(self.name, str) or not self.name:
            out.append(f"name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.shape, tuple):
            out.append(f"shape must be a tuple of ints and dim names, got {type(self.shape).__name__} {self.shape!r}")
        else:
            for axis, d in enumerate(self.shape):
                if isinstance(d, str) and d:
                    continue
                if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0:
                    continue
                out.append(f"shape entry {axis} is {d!r}; expected an int >= 0 (static) or a dim name such as 'batch'")
        out += _dtype_problems(self.dtype)
        bounds_ok = True
        for which in ("low", "high"):
            v = getattr(self, which)
            if not _real(v) or not math.isfinite(v):
                out.append(f"{which} must be a finite number, got {v!r}")
                bounds_ok = False
        if bounds_ok and not self.low < self.high:
            out.append(f"low ({self.low!r}) must be less than high ({self.high!r}): example values are drawn from [low, high)")
        return out

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        out = []
        for d in self.shape:
            if dimexpr.is_derived(d):  # "past + seq": from the named dims' sizes
                out.append(dimexpr.evaluate(d, dims))
            elif isinstance(d, str):
                if d not in dims:
                    raise UsageError(f"input {self.name!r}: no size given for dynamic dim {d!r} (have {sorted(dims)})")
                out.append(int(dims[d]))
            else:
                out.append(int(d))
        return tuple(out)


@dataclass(frozen=True)
class Tolerance:
    """Elementwise check ``|candidate - reference| <= atol + rtol * |reference|``."""

    atol: float
    rtol: float

    def to_dict(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol}


#: Element types a model input may have (ONNX numeric tensors that exporter feeds).
_DTYPE_KINDS = "biuf"


def _real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _dtype_problems(dtype: object) -> list[str]:
    if dtype == "bfloat16":  # a numpy dtype only once ml_dtypes is imported
        return []
    if not isinstance(dtype, str):
        return [f"dtype must be a numpy dtype name such as 'float32', got {type(dtype).__name__} {dtype!r}"]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return [f"dtype {dtype!r} is not a numpy dtype; use e.g. 'float32', 'int64', 'bool'"]
    if dt.kind not in _DTYPE_KINDS:
        return [f"dtype {dtype!r} is not numeric; inputs are bool, int, uint or float tensors"]
    if str(dt) != dtype:
        return [f"dtype {dtype!r} is spelled {str(dt)!r} by numpy; write {str(dt)!r}"]
    return []


def _positive_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1


def _tolerance_problems(what: str, value: object) -> list[str]:
    if not isinstance(value, Tolerance):
        return [f"{what} must be a Tolerance(atol, rtol), got {type(value).__name__} {value!r}"]
    return [
        f"{what} {which} must be a finite number >= 0, got {v!r}"
        for which, v in (("atol", value.atol), ("rtol", value.rtol))
        if not (_real(v) and math.isfinite(v) and v >= 0)
    ]


def _regex_problems(what: str, pattern: object) -> list[str]:
    if not isinstance(pattern, str):
        return [f"{what} must be a str regular expression, got {type(pattern).__name__} {pattern!r}"]
    try:
        re.compile(pattern)
    except re.error as e:
        return [f"{what} {pattern!r} is not a valid regular expression: {e}"]
    return []


# Defaults per dtype.  float32 is no looser than atol 1e-5 / rtol 1e-4 (we measured
# 1e-7..1e-6 between frameworks and their exports on the shipped models).
DEFAULT_TOLERANCES: Mapping[str, Tolerance] = MappingProxyType(
    {
        "float64": Tolerance(1e-10, 1e-8),
        "float32": Tolerance(1e-5, 1e-4),
        "float16": Tolerance(1e-3, 1e-2),
        "bfloat16": Tolerance(1e-2, 5e-2),
        "int64": Tolerance(0.0, 0.0),
        "int32": Tolerance(0.0, 0.0),
        "bool": Tolerance(0.0, 0.0),
    }
)


@dataclass(frozen=True)
class ModelSpec:
    """Everything exporter needs to rebuild, feed and check one architecture.

    Attributes:
        name: registry key.
        summary: one line for ``list``.
        inputs: input specs, in call order.
        outputs: output names, in return order.
        layout: rules mapping canonical (torch state_dict) names <-> flax variables.
        torch_factory: ``() -> torch.nn.Module`` (imports torch inside).
        flax_factory: ``() -> flax.linen.Module`` (imports flax inside).
        flax_apply_kwargs: extra keyword arguments for ``module.apply`` at inference
            (e.g. ``{"train": False}``).
        dims: default sizes of dynamic dims for example inputs (must include ``batch``).
        sweep_dims: sizes of the other dynamic dims that the parity sweep crosses with the
            batch sizes by default (``{"seq": (1, 16, 64)}``); empty: ``dims`` only.
        tolerances: per-dtype overrides of ``DEFAULT_TOLERANCES``.
        output_tolerances: per-output overrides (output name -> Tolerance).
        ignore_keys: regexes of keys found in real checkpoints that are not parameters
            (``num_batches_tracked``, ``position_ids``); dropped on load.
        key_rules: ``(regex, replacement)`` renames applied to checkpoint keys on load,
            after stripping common prefixes (``module.``, ``_orig_mod.``, ``model.``).
        frameworks: which builds exist; by default every framework whose factory is given.
        output_kinds: what each output is, for the task metrics of variants
            (``exporter.metrics``): ``"embedding"``, ``"logits"``, ``"hidden"`` or
            ``"exact"``; an undeclared float output is ``"hidden"``.
        variant_thresholds: per-model task-metric thresholds: variant -> (kind or output
            name) -> metric -> lowest passing value (``{"int8": {"logits": {"top1": 0.95}}}``).
        variant_tolerances: per-model elementwise tolerances of variants: variant ->
            output -> Tolerance.
        min_dims: smallest size of a dynamic dim where it is not 1 (a decoder's
            ``{"past": 0}``: the prefill has no cached positions); sweeps may use it.
    """

    name: str
    summary: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    layout: tuple[Rule, ...]
    torch_factory: Callable[[], Any] | None = None
    flax_factory: Callable[[], Any] | None = None
    flax_apply_kwargs: Mapping[str, Any] = field(default_factory=dict)
    dims: Mapping[str, int] = field(default_factory=lambda: {"batch": 2})
    sweep_dims: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    output_tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    ignore_keys: tuple[str, ...] = (r"(^|\.)num_batches_tracked$",)
    key_rules: tuple[tuple[str, str], ...] = ()
    frameworks: tuple[str, ...] = None  # type: ignore[assignment]  # None: set from the factories given
    output_kinds: Mapping[str, str] = field(default_factory=dict)
    variant_thresholds: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict)
    variant_tolerances: Mapping[str, Mapping[str, Tolerance]] = field(default_factory=dict)
    min_dims: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.frameworks is None:
            given = tuple(fw for fw, fn in (("torch", self.torch_factory), ("flax", self.flax_factory)) if fn is not None)
            object.__setattr__(self, "frameworks", given)
        problems = self.problems()
        if problems:
            raise UsageError.listing(
                f"bad model spec {self.name!r}; fix these fields of its ModelSpec(...)", problems
            )

    def problems(self) -> list[str]:
        """Every problem of this spec, one line each (empty: the spec is fine)."""
        out: list[str] = []
        if not (isinstance(self.name, str) and self.name and self.name.replace("_", "").replace("-", "").isalnum()):
            out.append(f"name {self.name!r} must be a non-empty str of letters, digits, '_' and '-'")
        if not isinstance(self.summary, str):
            out.append(f"summary must be a str, got {type(self.summary).__name__}")
        out += self._io_problems()
        out += self._dim_problems()
        out += self._tolerance_problems()
        out += self._build_problems()
        out += self._key_problems()
        out += self._variant_problems()
        if not isinstance(self.layout, tuple):
            out.append(f"layout must be a tuple of exporter.layouts.Rule, got {type(self.layout).__name__}")
        else:
            out += layouts.rule_problems(self.layout)
        return out

    def _variant_problems(self) -> list[str]:
        from exporter.metrics import spec_problems  # a leaf module: no import cycle

        return spec_problems(self)

    def _io_problems(self) -> list[str]:
        out: list[str] = []
        if not isinstance(self.inputs, tuple) or not self.inputs:
            out.append(f"inputs must be a non-empty tuple of TensorSpec, got {self.inputs!r}")
        else:
            for i, t in enumerate(self.inputs):
                if not isinstance(t, TensorSpec):
                    out.append(f"inputs entry {i} is not a TensorSpec: {type(t).__name__} {t!r}")
            names = [t.name for t in self.inputs if isinstance(t, TensorSpec)]
            out += [f"inputs name {n!r} is used {names.count(n)} times" for n in sorted(set(names)) if names.count(n) > 1]
        if not isinstance(self.outputs, tuple) or not self.outputs:
            out.append(f"outputs must be a non-empty tuple of output names, got {self.outputs!r}")
        else:
            out += [f"outputs entry {i} must be a non-empty str, got {o!r}" for i, o in enumerate(self.outputs)
                    if not (isinstance(o, str) and o)]
            names = list(self.outputs)
            out += [f"outputs name {n!r} is used {names.count(n)} times" for n in sorted(set(names), key=repr)
                    if names.count(n) > 1]
        return out

    def _dim_problems(self) -> list[str]:
        out: list[str] = []
        if not isinstance(self.dims, Mapping):
            return [f"dims must be a mapping of dim name -> default size, got {type(self.dims).__name__}"]
        if "batch" not in self.dims:
            out.append(f"dims must give a default batch size (e.g. dims={{'batch': 2}}), got {dict(self.dims)}")
        out += [f"dims size of {d!r} must be an int >= 1, got {v!r}" for d, v in self.dims.items() if not _positive_int(v)]
        specs = [t for t in self.inputs if isinstance(t, TensorSpec)] if isinstance(self.inputs, tuple) else []
        derived = list(dict.fromkeys(d for t in specs for d in t.shape if dimexpr.is_derived(d)))
        for d in derived:
            try:
                dimexpr.terms(d)
            except UsageError as e:
                out.append(str(e))
                specs = []
        dynamic = dimexpr.root_dims(t.shape for t in specs)  # derived dims follow from these
        out += [f"dims gives no default size for dynamic dim {d!r} (used by the inputs)" for d in dynamic if d not in self.dims]
        if not isinstance(self.min_dims, Mapping):
            return out + [f"min_dims must be a mapping of dim name -> smallest size, got {type(self.min_dims).__name__}"]
        out += [f"min_dims names unknown dim {d!r}" for d in self.min_dims if d not in dynamic]
        out += [f"min_dims size of {d!r} must be 0 or 1, got {v!r}" for d, v in self.min_dims.items() if v not in (0, 1)]
        if not isinstance(self.sweep_dims, Mapping):
            return out + [f"sweep_dims must be a mapping of dim name -> sizes, got {type(self.sweep_dims).__name__}"]
        for d, sizes in self.sweep_dims.items():
            if d == "batch":
                out.append("sweep_dims names 'batch'; batch sizes are set by the sweep itself (--batch-sizes)")
            elif d not in dynamic:
                out.append(f"sweep_dims names unknown dim {d!r}; the inputs' dynamic dims are: {', '.join(dynamic) or 'none'}")
            if not isinstance(sizes, (tuple, list)) or not sizes:
                out.append(f"sweep_dims sizes of {d!r} must be a non-empty tuple of ints >= 1, got {sizes!r}")
            else:
                least = self.min_dims.get(d, 1)
                out += [f"sweep_dims size {v!r} of {d!r} is not an int >= {least}" for v in sizes if not (_positive_int(v) or least == 0 and v == 0 and not isinstance(v, bool))]
        return out

    def _tolerance_problems(self) -> list[str]:
        out: list[str] = []
        for what, table in (("tolerances", self.tolerances), ("output_tolerances", self.output_tolerances)):
            if not isinstance(table, Mapping):
                out.append(f"{what} must be a mapping of name -> Tolerance, got {type(table).__name__}")
                continue
            for key, tol in table.items():
                out += _tolerance_problems(f"{what}[{key!r}]", tol)
        if isinstance(self.tolerances, Mapping):
            out += [f"tolerances key {p}" for k in self.tolerances for p in _dtype_problems(k)]
        if isinstance(self.output_tolerances, Mapping) and isinstance(self.outputs, tuple):
            out += [
                f"output_tolerances names unknown output {k!r}; the outputs are: {', '.join(map(str, self.outputs))}"
                for k in self.output_tolerances if k not in self.outputs
            ]
        return out

    def _build_problems(self) -> list[str]:
        out: list[str] = []
        factories = {"torch": self.torch_factory, "flax": self.flax_factory}
        for fw, fn in factories.items():
            if fn is not None and not callable(fn):
                out.append(f"{fw}_factory must be a callable that builds the model, got {type(fn).__name__}")
        if not isinstance(self.frameworks, tuple):
            return out + [f"frameworks must be a tuple such as ('torch', 'flax'), got {self.frameworks!r}"]
        for fw in self.frameworks:
            if fw not in factories:
                out.append(f"frameworks entry {fw!r} is unknown; use 'torch' and/or 'flax'")
            elif factories[fw] is None:
                out.append(f"frameworks lists {fw!r} but {fw}_factory is not given")
        out += [f"frameworks lists {fw!r} twice" for fw in sorted(set(self.frameworks), key=repr) if self.frameworks.count(fw) > 1]
        if not isinstance(self.flax_apply_kwargs, Mapping) or not all(isinstance(k, str) for k in self.flax_apply_kwargs):
            out.append(f"flax_apply_kwargs must be a mapping of keyword name -> value, got {self.flax_apply_kwargs!r}")
        return out

    def _key_problems(self) -> list[str]:
        out: list[str] = []
        if not isinstance(self.ignore_keys, tuple):
            out.append(f"ignore_keys must be a tuple of regular expressions, got {type(self.ignore_keys).__name__}")
        else:
            for p in self.ignore_keys:
                out += _regex_problems("ignore_keys pattern", p)
        if not isinstance(self.key_rules, tuple):
            return out + [f"key_rules must be a tuple of (regex, replacement) pairs, got {type(self.key_rules).__name__}"]
        for rule in self.key_rules:
            if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[1], str)):
                out.append(f"key_rules entry {rule!r} must be a (regex, replacement) pair of str")
                continue
            out += _regex_problems("key_rules pattern", rule[0])
        return out

    # -- builds -----------------------------------------------------------------------
    def factory(self, framework: str) -> Callable[[], Any]:
        """The build factory for ``framework`` (``"torch"`` or ``"flax"``).

        Raises:
            UsageError: an unknown framework, or the model has no build for it.
        """
        if framework not in ("torch", "flax"):
            raise UsageError(f"unknown framework {framework!r}; expected 'torch' or 'flax'")
        fn = self.torch_factory if framework == "torch" else self.flax_factory
        if fn is None or framework not in self.frameworks:
            raise UsageError(f"model {self.name!r} has no {framework} build (it has: {', '.join(self.frameworks) or 'none'})")
        return fn

    # -- tolerances -------------------------------------------------------------------
    def tolerance(self, output: str | None = None, dtype: str = "float32") -> Tolerance:
        """The tolerance for ``output`` (per-output override, else per-dtype)."""
        if output is not None and output in self.output_tolerances:
            return self.output_tolerances[output]
        if dtype in self.tolerances:
            return self.tolerances[dtype]
        if dtype in DEFAULT_TOLERANCES:
            return DEFAULT_TOLERANCES[dtype]
        raise UsageError(f"model {self.name!r}: no tolerance known for dtype {dtype!r}")

    # -- inputs -----------------------------------------------------------------------
    def example_inputs(self, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic example inputs (numpy), keyed by input name.

        ``dims`` overrides the default dynamic-dim sizes (e.g. ``{"batch": 7}``).
        The same (spec, dims, seed) always yields bit-identical arrays.
        """
        sizes = {**self.dims, **(dims or {})}
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = t.concrete_shape(sizes)
            dt = np.dtype(t.dtype)
            if dt.kind in "iu":
                out[t.name] = rng.integers(int(t.low), int(t.high), size=shape, dtype=dt)
            elif dt.kind == "b":
                out[t.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                out[t.name] = (t.low + (t.high - t.low) * rng.random(size=shape, dtype=np.float64)).astype(dt)
        return out

    def dynamic_dims(self) -> list[str]:
        """The independent dynamic dims, in order of first use (a derived dim such as
        ``"past + seq"`` contributes its names, not itself)."""
        return dimexpr.root_dims(t.shape for t in self.inputs)

    # -- parameters -------------------------------------------------------------------
    def canonical_names(self) -> list[str]:
        """Sorted canonical parameter/buffer names this model expects (from its layout)."""
        from exporter.layouts import canonical_names

        return canonical_names(self.layout)


_REGISTRY: dict[str, ModelSpec] = {}
_BUILTINS_LOADED = False
_BUILTIN_MODULES = (
    "exporter.models.mlp",
    "exporter.models.cnn",
    "exporter.models.transformer",
    "exporter.models.bert",
    "exporter.models.minilm",
    "exporter.models.gpt2",
    "exporter.models.resnet",
)


_ORIGINS: dict[str, str] = {}  # model name -> the module that registered it
_PLUGINS: list[str] = []  # modules load_plugins imported, in order (worker processes import them too)


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry; refuses a duplicate name.  Usable as a plain call."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise UsageError(f"model {spec.name!r} is already registered; pick another name or unregister() it first")
    _REGISTRY[spec.name] = spec
    _ORIGINS[spec.name] = _caller_module()
    return spec


def _caller_module() -> str:
    """The module that called :func:`register` (through a family's ``register`` too)."""
    f = sys._getframe(1)
    while f is not None and f.f_globals.get("__name__") in (__name__, "exporter.models.family"):
        f = f.f_back
    return str(f.f_globals.get("__name__", "__main__")) if f is not None else "__main__"


def origin(name: str) -> str | None:
    """The module that registered model ``name`` (``"__main__"`` for a script), None if unknown."""
    return _ORIGINS.get(name)


def plugins() -> tuple[str, ...]:
    """The registry modules :func:`load_plugins` imported (``--registry``, ``EXPORTER_REGISTRY``)."""
    return tuple(_PLUGINS)


def unregister(name: str) -> None:
    """Remove a model (for tests and for users replacing a builtin)."""
    _REGISTRY.pop(name, None)
    _ORIGINS.pop(name, None)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)  # ours: a builtin that fails to import is a bug
    load_plugins(os.environ.get("EXPORTER_REGISTRY", ""))
    _load_entry_points()


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="exporter.models"):
        ep.load()


def load_plugins(modules: str | list[str] | tuple[str, ...]) -> None:
    """Import user modules that call ``register``.  ``modules``: list or comma-separated string."""
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    for mod in modules:
        try:
            importlib.import_module(mod)
            if mod not in _PLUGINS:
                _PLUGINS.append(mod)
        except ImportError as e:
            raise UsageError(
                f"registry module {mod!r} cannot be imported ({e}); it must be importable from the "
                "current directory or PYTHONPATH and call exporter.models.registry.register(...)"
            ) from e


def get(name: str) -> ModelSpec:
    """The spec registered as ``name``; raises ``UnknownModelError`` listing the known names."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = sorted(_REGISTRY)
        shown = ", ".join(known[:MAX_LISTED]) + (f" ... and {len(known) - MAX_LISTED} more" if len(known) > MAX_LISTED else "")
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {shown or '(none)'}. "
            "Register your own with exporter.models.registry.register() and --registry MODULE"
        ) from None


def names() -> list[str]:
    """Sorted names of every registered model."""
    _load_builtins()
    return sorted(_REGISTRY)


def specs() -> list[ModelSpec]:
    return [_REGISTRY[n] for n in names()]
