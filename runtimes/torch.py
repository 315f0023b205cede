"""torch adapter: the registry's torch build, eager, loaded with canonical state.

This module imports torch at the top; it is itself imported only on demand (by
``exporter.runtimes.base.load_runtime`` or directly), so ``import runtimes`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from exporter.runtimes.base import Runtime, missing_dependency, spec_io

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise missing_dependency("torch", "runtime 'torch'") from e

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec

__all__ = ["TorchRuntime"]


class TorchRuntime(Runtime):
    """The torch build of a registry model in eval mode, run eagerly under ``inference_mode``.

    Args:
        spec: the registry entry.
        canonical: canonical state (``exporter.rebuild.prepare_state`` / ``init_state``).

    Raises:
        StateMismatchError: the state does not fit the model.
        UsageError: the model has no torch build.
    """

    name: ClassVar[str] = "torch"
    artifact_kind: ClassVar[str] = "state"

    def __init__(self, spec: ModelSpec, canonical: Mapping[str, np.ndarray]) -> None:
        from exporter.rebuild import torch_module

        self._init(spec, torch_module(spec, canonical))

    @classmethod
    def from_module(cls, spec: ModelSpec, module: Any) -> TorchRuntime:
        """Wrap an already built module (switched to eval mode) instead of rebuilding it."""
        self = cls.__new__(cls)
        self._init(spec, module.eval())
        return self

    def _init(self, spec: ModelSpec, module: Any) -> None:
        self.spec = spec
        self.module = module
        self.inputs, self.outputs = spec_io(spec)
        self.source = f"model {spec.name!r}, torch build"

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from exporter.rebuild import run_torch

        return run_torch(self.spec, self.module, inputs)

    def close(self) -> None:
        self.module = None
