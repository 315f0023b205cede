"""Optional dependencies: import one by name, or say which extra installs it.

Every "X needs Y, which is not installed" message in exporter comes from here, so the
fix it names (``pip install 'exporter[torch]'``) is the same everywhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType, ModuleType

from exporter.errors import MissingDependencyError

__all__ = ["EXTRAS", "missing", "require"]

#: Top-level module of an optional dependency -> the extra that installs it.
EXTRAS: Mapping[str, str] = MappingProxyType(
    {
        "torch": "torch",
        "onnxscript": "torch",
        "onnx_ir": "torch",
        "jax": "jax",
        "jaxlib": "jax",
        "flax": "jax",
        "jax2onnx": "jax",
        "optax": "jax",
        "orbax": "jax",
        "torchvision": "torchvision",
        "openvino": "openvino",
    }
)


def missing(module: str, purpose: str) -> MissingDependencyError:
    """The typed error for ``purpose`` needing the optional ``module``.

    Args:
        module: the module that failed to import (``"torch"``, ``"flax.linen"``).
        purpose: what needed it (``"the torch runtime"``, ``"reading a .pt file"``).
    """
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    fix = f"pip install 'exporter[{extra}]'" if extra else f"pip install {top}"
    return MissingDependencyError(f"{purpose} needs {top!r}, which is not installed; install with: {fix}")


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :func:`missing`'s error.

    Only a missing module is turned into ``MissingDependencyError``; an ``ImportError``
    raised *inside* an installed package (a broken install, a bug) propagates.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and not (module == e.name or module.startswith(e.name + ".") or e.name.split(".")[0] in EXTRAS):
            raise
        raise missing(e.name or module, purpose) from e
