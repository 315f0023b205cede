"""Capture and restore every host RNG a training step draws from, for a bit-exact resume.

Python ``random``, NumPy's global RNG and named ``numpy.random.Generator`` objects, and
torch's CPU (and CUDA) generators.  A JAX key is data: the caller stores it as a tensor.
The captured state is a (JSON document, tensors) pair, stored like any other checkpoint
state (:mod:`exporter.checkpoint`); its layout is part of the checkpoint format.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from exporter.deps import require
from exporter.errors import CheckpointError
from exporter.treecodec import decode_tree, encode_tree

__all__ = ["capture_rng", "restore_rng"]


def capture_rng(
    generators: Mapping[str, np.random.Generator] | None = None, *, torch: bool | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Capture Python ``random``, NumPy (global + named generators) and torch CPU/CUDA RNG states.

    Args:
        generators: named ``numpy.random.Generator`` objects to capture as well.
        torch: capture torch's states (default: when torch is already imported).

    Returns:
        (JSON document, tensors) to store; restore with :func:`restore_rng`.

    Raises:
        MissingDependencyError: ``torch=True`` and torch is not installed.
    """
    tensors: dict[str, np.ndarray] = {}
    py = random.getstate()
    doc: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy_global": encode_tree(np.random.get_state(legacy=False), tensors, "numpy_global"),
        "numpy": {n: encode_tree(g.bit_generator.state, tensors, f"numpy/{n}") for n, g in (generators or {}).items()},
    }
    if torch is None:
        torch = "torch" in sys.modules
    if torch:
        t = require("torch", "capturing torch's RNG state")
        tensors["torch/cpu"] = t.get_rng_state().numpy().copy()
        doc["torch_cpu"] = "torch/cpu"
        if t.cuda.is_available():
            states = t.cuda.get_rng_state_all()
            doc["torch_cuda"] = [f"torch/cuda/{i}" for i in range(len(states))]
            for i, s in enumerate(states):
                tensors[f"torch/cuda/{i}"] = s.numpy().copy()
    return doc, tensors


def restore_rng(
    doc: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    generators: Mapping[str, np.random.Generator] | None = None,
) -> None:
    """Restore the RNG states captured by :func:`capture_rng` (named generators in place).

    Raises:
        CheckpointError: a named generator has no saved state, or CUDA states were saved
            but CUDA is not available now (a bit-exact resume is then impossible).
        MissingDependencyError: torch states were saved and torch is not installed.
    """
    v, state, gauss = doc["python"]
    random.setstate((v, tuple(state), gauss))
    np.random.set_state(decode_tree(doc["numpy_global"], tensors))
    for name, g in (generators or {}).items():
        if name not in doc.get("numpy", {}):
            raise CheckpointError(f"checkpoint holds no state for NumPy generator {name!r}")
        g.bit_generator.state = decode_tree(doc["numpy"][name], tensors)
    if "torch_cpu" in doc:
        torch = require("torch", "restoring torch's RNG state from a checkpoint")
        torch.set_rng_state(torch.from_numpy(np.array(tensors[doc["torch_cpu"]])))
        if doc.get("torch_cuda"):
            if not torch.cuda.is_available():
                raise CheckpointError(
                    "the checkpoint was written with CUDA RNG states but CUDA is not available; resume on a "
                    "machine with the same GPUs for a bit-exact run"
                )
            torch.cuda.set_rng_state_all([torch.from_numpy(np.array(tensors[k])) for k in doc["torch_cuda"]])
