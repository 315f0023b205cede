"""exporter: rebuild models from saved state, export them to ONNX, prove numerically that the export matches.

The Python API has the command line's operations under the same names::

    import exporter
    exporter.list_models()
    report = exporter.export("mlp", out="out")        # bool(report) is the verdict
    exporter.verify("out/mlp/torch")                   # needs only onnx + onnxruntime
    exporter.convert("ckpt.pt", "ckpt.safetensors")
    exporter.train("mlp", "ckpts", 100, every=10)
    exporter.load_state("ckpt.safetensors")

Names are resolved lazily (module ``__getattr__``): ``import exporter`` imports neither
torch, jax nor onnxruntime.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

from exporter.errors import (
    CheckpointCorruptError,
    CheckpointError,
    ExporterError,
    ExportError,
    MissingDependencyError,
    ParityError,
    StateFileError,
    StateMismatchError,
    UnknownModelError,
    UsageError,
)

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None = the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "list_models": ("exporter.api", "list_models"),
    "inspect": ("exporter.api", "inspect"),
    "export": ("exporter.api", "export"),
    "verify": ("exporter.api", "verify"),
    "convert": ("exporter.api", "convert"),
    "train": ("exporter.train", None),
    "ExportReport": ("exporter.api", "ExportReport"),
    "ConvertReport": ("exporter.api", "ConvertReport"),
    "ModelInfo": ("exporter.api", "ModelInfo"),
    "BundleResult": ("exporter.bundle", "BundleResult"),
    "ParityReport": ("exporter.parity", "ParityReport"),
    "load_state": ("exporter.state", "load_state"),
    "save_state": ("exporter.state", "save_state"),
    "inspect_state": ("exporter.state", "inspect_state"),
    "assert_parity": ("exporter.testing", "assert_parity"),
    "DEFAULT_OPSET": ("exporter.onnx_export", "DEFAULT_OPSET"),
}

__all__ = [
    "__version__",
    *_LAZY,
    "ExporterError",
    "UsageError",
    "UnknownModelError",
    "MissingDependencyError",
    "StateFileError",
    "CheckpointCorruptError",
    "StateMismatchError",
    "CheckpointError",
    "ExportError",
    "ParityError",
]


class _CallableModule(ModuleType):
    """``exporter.train`` is both helper D's module and the API's ``train(...)`` operation:
    calling the module calls its ``train`` function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.train(*args, **kwargs)


class _Package(ModuleType):
    # The import system binds a submodule on its package with setattr() when it is first
    # imported; make exporter.train callable at that moment, whoever imports it first.
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and type(value) is ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
if isinstance(sys.modules.get(__name__ + ".train"), ModuleType):  # pragma: no cover - reload
    setattr(sys.modules[__name__], "train", sys.modules[__name__ + ".train"])


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'exporter' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
