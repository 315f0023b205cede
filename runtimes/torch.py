"""torch adapter: the registry's torch build, eager, in eval mode under ``inference_mode``.

This module imports torch at the top; it is itself imported only on demand (by
``exporter.runtimes.base.load_runtime`` or directly), so ``import exporter.runtimes``
stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from exporter.deps import require
from exporter.runtimes.base import Runtime, name_outputs, spec_io

torch = require("torch", "runtime 'torch'")

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec

__all__ = ["TorchRuntime"]


def _tensor(a: np.ndarray) -> Any:
    """A tensor over ``a``'s memory; read-only or non-contiguous arrays (test data read back
    from files) are copied first, since torch needs writable, C-ordered memory."""
    return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C"))


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
        """Wrap an already built ``torch.nn.Module`` (switched to eval mode) instead of rebuilding it.

        Raises:
            UsageError: the model has no torch build.
        """
        self = cls.__new__(cls)
        self._init(spec, module.eval())
        return self

    def _init(self, spec: ModelSpec, module: Any) -> None:
        spec.factory("torch")
        self.spec = spec
        self.module = module
        self.inputs, self.outputs = spec_io(spec)
        self.source = f"model {spec.name!r}, torch build"

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [_tensor(inputs[i.name]) for i in self.inputs]
        try:
            with torch.inference_mode():
                result = self.module(*args)
        except Exception as e:  # the model's own forward failed on these inputs
            raise self.run_error(e) from e
        outs = name_outputs(self.spec, "torch", result, (torch.Tensor,))
        return {n: o.detach().cpu().numpy().copy() for n, o in outs.items()}

    def close(self) -> None:
        self.module = None
