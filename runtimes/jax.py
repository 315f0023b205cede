"""jax adapter: the registry's flax build, ``module.apply`` under ``jax.jit``.

This module imports jax and flax at the top; it is itself imported only on demand (by
``exporter.runtimes.base.load_runtime`` or directly), so ``import exporter.runtimes``
stays cheap.  One compilation per distinct input shape (a sweep of four batch sizes
compiles four times).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from exporter.deps import require
from exporter.runtimes.base import Runtime, name_outputs, spec_io

jax = require("jax", "runtime 'jax'")
require("flax", "runtime 'jax'")

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
        """Wrap flax variables (``{"params": ..., "batch_stats": ...}``) directly.

        Raises:
            UsageError: the model has no flax build.
        """
        self = cls.__new__(cls)
        self._init(spec, variables)
        return self

    def _init(self, spec: ModelSpec, variables: Mapping[str, Any]) -> None:
        module = spec.factory("flax")()
        self.spec = spec
        self.variables = variables
        self.inputs, self.outputs = spec_io(spec)
        self.source = f"model {spec.name!r}, flax build"
        kwargs = dict(spec.flax_apply_kwargs)

        def apply(variables: Any, *args: Any) -> Any:
            return module.apply(variables, *args, **kwargs)

        self._apply = jax.jit(apply)

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [inputs[i.name] for i in self.inputs]
        try:  # tracing runs the model's own code: its errors surface here, as do XLA's
            result = jax.block_until_ready(self._apply(self.variables, *args))
        except Exception as e:
            raise self.run_error(e) from e
        outs = name_outputs(self.spec, "flax", result, (jax.Array, np.ndarray))
        return {n: np.asarray(jax.device_get(o)) for n, o in outs.items()}

    def close(self) -> None:
        self.variables = {}
