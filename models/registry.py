"""The shared model registry: one frozen ``ModelSpec`` per architecture.

A spec names a torch build and a flax build of the *same* architecture, the example-input
spec (names, dtypes, shapes with named dynamic dims), the layout rules that map canonical
(torch-style dotted) parameter names to flax variables, and the default tolerances.

Builds are factories that import torch / flax lazily, so importing the registry is cheap.

Users register their own architectures from their own module::

    from exporter.models.registry import ModelSpec, TensorSpec, register
    register(ModelSpec(name="mine", ...))

and point exporter at it with ``python -m exporter --registry my_pkg.my_models ...`` or the
``EXPORTER_REGISTRY`` environment variable (comma-separated module paths), or an
``exporter.models`` entry point in their package metadata.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.errors import UnknownModelError, UsageError

if TYPE_CHECKING:  # pragma: no cover
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

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        out = []
        for d in self.shape:
            if isinstance(d, str):
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
        frameworks: which builds exist.
    """

    name: str
    summary: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    layout: tuple["Rule", ...]
    torch_factory: Callable[[], Any] | None = None
    flax_factory: Callable[[], Any] | None = None
    flax_apply_kwargs: Mapping[str, Any] = field(default_factory=dict)
    dims: Mapping[str, int] = field(default_factory=lambda: {"batch": 2})
    sweep_dims: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    output_tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    ignore_keys: tuple[str, ...] = (r"(^|\.)num_batches_tracked$",)
    key_rules: tuple[tuple[str, str], ...] = ()
    frameworks: tuple[str, ...] = ("torch", "flax")

    def __post_init__(self) -> None:
        assert self.name and self.name.replace("_", "").replace("-", "").isalnum(), self.name
        assert self.inputs and self.outputs, self.name
        assert "batch" in self.dims, f"{self.name}: dims must give a default batch size"

    # -- builds -----------------------------------------------------------------------
    def factory(self, framework: str) -> Callable[[], Any]:
        """The build factory for ``framework`` (``"torch"`` or ``"flax"``).

        Raises:
            UsageError: the model has no build for ``framework``.
        """
        fn = {"torch": self.torch_factory, "flax": self.flax_factory}.get(framework)
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
        seen: list[str] = []
        for t in self.inputs:
            for d in t.shape:
                if isinstance(d, str) and d not in seen:
                    seen.append(d)
        return seen

    # -- parameters -------------------------------------------------------------------
    def canonical_names(self) -> list[str]:
        """Sorted canonical parameter/buffer names this model expects (from its layout)."""
        from exporter.layouts import canonical_names

        return canonical_names(self.layout)


_REGISTRY: dict[str, ModelSpec] = {}
_BUILTINS_LOADED = False
_BUILTIN_MODULES = ("exporter.models.mlp", "exporter.models.cnn", "exporter.models.transformer", "exporter.models.minilm")


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry; refuses a duplicate name.  Usable as a plain call."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise UsageError(f"model {spec.name!r} is already registered; pick another name or unregister() it first")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a model (for tests and for users replacing a builtin)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a builtin not written yet
            if e.name != mod:
                raise
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
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY)) or '(none)'}. "
            "Register your own with exporter.models.registry.register() and --registry MODULE"
        ) from None


def names() -> list[str]:
    """Sorted names of every registered model."""
    _load_builtins()
    return sorted(_REGISTRY)


def specs() -> list[ModelSpec]:
    return [_REGISTRY[n] for n in names()]
