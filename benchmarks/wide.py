"""A wide MLP registered from the benchmark itself (not shipped in the registry).

``bench_wide_<width>x<depth>``: ``depth`` square Linear layers of ``width`` with ReLU in
between; canonical keys ``layers.<i>.weight`` (width, width) and ``layers.<i>.bias``; input
``x`` (batch, width) float32, output ``y``.  Weights: ``depth * width * (width + 1) * 4`` bytes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from exporter.layouts import Dense
from exporter.models import registry
from exporter.models.registry import ModelSpec, TensorSpec


def name(width: int, depth: int) -> str:
    return f"bench_wide_{width}x{depth}"


def weight_bytes(width: int, depth: int) -> int:
    return depth * width * (width + 1) * 4


def spec(width: int, depth: int) -> ModelSpec:
    """Register (once) and return the wide MLP of this size."""
    n = name(width, depth)
    if n in registry.names():
        return registry.get(n)

    def build_torch() -> Any:
        import torch
        from torch import nn

        class Wide(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                for i, layer in enumerate(self.layers):
                    x = layer(x)
                    if i + 1 < depth:
                        x = torch.relu(x)
                return x

        return Wide()

    def build_flax() -> Any:
        import flax.linen as nn

        class Wide(nn.Module):
            @nn.compact
            def __call__(self, x: Any) -> Any:
                for i in range(depth):
                    x = nn.Dense(width, name=f"layers_{i}")(x)
                    if i + 1 < depth:
                        x = nn.relu(x)
                return x

        return Wide()

    return registry.register(
        ModelSpec(
            name=n,
            summary=f"benchmark: {depth} x Linear({width}, {width}) with ReLU ({weight_bytes(width, depth) / 2**30:.2f} GiB)",
            inputs=(TensorSpec("x", ("batch", width), "float32"),),
            outputs=("y",),
            layout=tuple(Dense(f"layers.{i}", f"layers_{i}") for i in range(depth)),
            torch_factory=build_torch,
            flax_factory=build_flax,
            dims={"batch": 2},
        )
    )


def write_state(path: Path, width: int, depth: int, seed: int = 0) -> int:
    """Write a seeded canonical state of the wide MLP as safetensors, layer by layer.

    He-scaled normal weights keep activations O(1) through the ReLU stack.  Written with
    ``safetensors.numpy.save_file`` (not through our API: this only prepares the input).

    Returns:
        The bytes of the tensors.
    """
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    scale = math.sqrt(2.0 / width)
    state: dict[str, np.ndarray] = {}
    for i in range(depth):
        w = rng.standard_normal((width, width), dtype=np.float32)
        w *= np.float32(scale)
        state[f"layers.{i}.weight"] = w
        state[f"layers.{i}.bias"] = (0.01 * rng.standard_normal(width)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(state, str(tmp))
    os.replace(tmp, path)  # a file under the final name is always complete (it is reused)
    return sum(a.nbytes for a in state.values())
