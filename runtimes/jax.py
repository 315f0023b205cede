"""jax adapter: the registry's flax build, ``module.apply`` under ``jax.jit``.

This module imports jax and flax at the top; it is itself imported only on demand (by
``exporter.runtimes.base.load_runtime`` or directly), so ``import runtimes`` stays cheap.  One
compilation per distinct input shape (a sweep of four batch sizes compiles four times).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from exporter.errors import UsageError
from exporter.runtimes.base import Runtime, missing_dependency, spec_io

try:
    import flax  # noqa: F401
    import jax
except ImportError as e:  # pragma: no cover - exercised only without jax
    raise missing_dependency((e.name or "jax").split(".")[0], "runtime 'jax'") from e

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec

__all__ = ["JaxRuntime"]


class JaxRuntime(Runtime):
    """The flax build of a registry model: jitted ``apply`` with ``spec.flax_apply_kwargs``.

    Args:
        spec: the registry entry.
        canonical: canonical state, converted to flax variables by ``exporter.rebuild``.

    Raises:
        StateMismatchError: the state does not fit the model.
        UsageError: the model has no flax build.
    """

    name: ClassVar[str] = "jax"
    artifact_kind: ClassVar[str] = "state"

    def __init__(self, spec: ModelSpec, canonical: Mapping[str, np.ndarray]) -> None:
        from exporter.rebuild import flax_variables

        self._init(spec, flax_variables(spec, canonical))

    @classmethod
    def from_variables(cls, spec: ModelSpec, variables: Mapping[str, Any]) -> JaxRuntime:
        """Wrap flax variables (``{"params": ..., "batch_stats": ...}``) directly."""
        self = cls.__new__(cls)
        self._init(spec, variables)
        return self

    def _init(self, spec: ModelSpec, variables: Mapping[str, Any]) -> None:
        if spec.flax_factory is None or "flax" not in spec.frameworks:
            raise UsageError(f"model {spec.name!r} has no flax build (it has: {', '.join(spec.frameworks)})")
        self.spec = spec
        self.variables = variables
        self.inputs, self.outputs = spec_io(spec)
        self.source = f"model {spec.name!r}, flax build"
        module = spec.flax_factory()
        kwargs = dict(spec.flax_apply_kwargs)

        def apply(variables: Any, *args: Any) -> Any:
            return module.apply(variables, *args, **kwargs)

        self._apply = jax.jit(apply)

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self._apply(self.variables, *(inputs[i.name] for i in self.inputs))
        if isinstance(result, Mapping):
            outs = [result[n] for n in self.outputs]
        elif isinstance(result, (tuple, list)):
            outs = list(result)
        else:
            outs = [result]
        assert len(outs) == len(self.outputs), (
            f"{self.spec.name}: flax build returned {len(outs)} outputs, spec names {self.outputs}"
        )
        return {n: np.asarray(jax.device_get(o)) for n, o in zip(self.outputs, outs, strict=True)}

    def close(self) -> None:
        self.variables = {}
