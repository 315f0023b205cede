"""``cnn``: a small image classifier.  Input ``x`` (batch, 1, 28, 28) NCHW float32, output ``y`` (batch, 10).

    conv1 3x3 1->8, pad 1 -> bn1 -> ReLU -> max-pool 2 -> (8, 14, 14)
    conv2 3x3 8->16, pad 1 -> bn2 -> GELU (exact) -> max-pool 2 -> (16, 7, 7)
    flatten (C, H, W order) -> fc 784 -> 10

BatchNorm runs in inference mode (running statistics).  The flax build takes the same NCHW
input, transposes to NHWC for its convolutions and back to NCHW before flattening, so the
canonical ``fc.weight`` is identical in both frameworks.
"""

from __future__ import annotations

from typing import Any

from exporter.deps import require
from exporter.layouts import BatchNorm, Conv, Dense
from exporter.models.registry import ModelSpec, TensorSpec, register

C1, C2, CLASSES = 8, 16, 10
BN_EPS = 1e-5  # torch default; flax's default is also 1e-5 but we say it explicitly


def build_torch() -> Any:
    """The torch build (``torch.nn.Module``)."""
    torch = require("torch", "the torch build of model 'cnn'")
    nn = torch.nn

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, C1, kernel_size=3, padding=1)
            self.bn1 = nn.BatchNorm2d(C1, eps=BN_EPS, momentum=0.1)
            self.conv2 = nn.Conv2d(C1, C2, kernel_size=3, padding=1)
            self.bn2 = nn.BatchNorm2d(C2, eps=BN_EPS, momentum=0.1)
            self.fc = nn.Linear(C2 * 7 * 7, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
            x = nn.functional.max_pool2d(nn.functional.gelu(self.bn2(self.conv2(x))), 2)
            return self.fc(torch.flatten(x, 1))

    return CNN()


def build_flax() -> Any:
    """The flax build (``flax.linen.Module``); ``train=False`` uses the running statistics."""
    nn = require("flax.linen", "the flax build of model 'cnn'")
    jnp = require("jax.numpy", "the flax build of model 'cnn'")

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:
            pad = ((1, 1), (1, 1))
            x = jnp.transpose(x, (0, 2, 3, 1))  # NCHW -> NHWC
            x = nn.Conv(C1, kernel_size=(3, 3), padding=pad, name="conv1")(x)
            # flax momentum 0.9 == torch momentum 0.1 (flax weighs the old statistic).
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS, name="bn1")(x)
            # Keyword window/strides: jax2onnx fails on positional ones (see FACTS.md).
            x = nn.max_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
            x = nn.Conv(C2, kernel_size=(3, 3), padding=pad, name="conv2")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS, name="bn2")(x)
            x = nn.max_pool(nn.gelu(x, approximate=False), window_shape=(2, 2), strides=(2, 2))
            x = jnp.transpose(x, (0, 3, 1, 2))  # back to NCHW so the flatten order matches torch
            x = x.reshape((x.shape[0], -1))
            return nn.Dense(CLASSES, name="fc")(x)

    return CNN()


SPEC = register(
    ModelSpec(
        name="cnn",
        summary="Conv-BN-ReLU-pool, Conv-BN-GELU-pool, Linear; (batch, 1, 28, 28) -> 10",
        inputs=(TensorSpec("x", ("batch", 1, 28, 28), "float32"),),
        outputs=("y",),
        output_kinds={"y": "logits"},
        layout=(
            Conv("conv1", "conv1"),
            BatchNorm("bn1", "bn1"),
            Conv("conv2", "conv2"),
            BatchNorm("bn2", "bn2"),
            Dense("fc", "fc"),
        ),
        torch_factory=build_torch,
        flax_factory=build_flax,
        flax_apply_kwargs={"train": False},
        dims={"batch": 2},
    )
)
