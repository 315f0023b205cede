"""exporter: rebuild models from saved state, export them to ONNX, prove numerically that the export matches.

The Python API has the command line's operations under the same names::

    import exporter
    exporter.list_models()
    report = exporter.export("mlp", out="out")        # bool(report) is the verdict
    exporter.verify("out/mlp/torch")                   # needs only onnx + onnxruntime
    exporter.explain("out/mlp/torch")                  # which module broke (rebuilds the framework model)
    exporter.convert("ckpt.pt", "ckpt.safetensors")
    exporter.train("mlp", "ckpts", 100, every=10)
    exporter.load_state("ckpt.safetensors")

Names are resolved lazily (module ``__getattr__``): ``import exporter`` imports neither
torch, jax nor onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import Any

from exporter.errors import (
    BundleError,
    CheckpointCorruptError,
    CheckpointError,
    ExporterError,
    ExportError,
    MissingDependencyError,
    ParityError,
    RunError,
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
    "verify_all": ("exporter.api", "verify_all"),
    "explain": ("exporter.api", "explain"),
    "convert": ("exporter.api", "convert"),
    "train": ("exporter.api", "train"),
    "ExportReport": ("exporter.api", "ExportReport"),
    "VerifyReport": ("exporter.api", "VerifyReport"),
    "ConvertReport": ("exporter.api", "ConvertReport"),
    "ModelInfo": ("exporter.api", "ModelInfo"),
    "BundleResult": ("exporter.bundle", "BundleResult"),
    "ParityReport": ("exporter.parity", "ParityReport"),
    "ExplainReport": ("exporter.divergence", "ExplainReport"),
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
    "BundleError",
    "ExportError",
    "RunError",
    "ParityError",
]


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
