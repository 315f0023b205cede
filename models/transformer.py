"""``transformer``: one pre-LayerNorm encoder block.  Input ``x`` (batch, seq, 32) float32,
output ``y`` of the same shape.

    h = x + attn(ln1(x))                  multi-head self-attention, 4 heads of 8
    y = h + fc2(gelu(fc1(ln2(h))))        MLP 32 -> 64 -> 32, exact GELU

torch uses ``nn.MultiheadAttention`` (batch_first), flax ``MultiHeadDotProductAttention``;
the ``PackedAttention`` rule splits/merges torch's packed ``in_proj_weight``.  LayerNorm
epsilon is torch's 1e-5 in both (flax's default is 1e-6).
"""

from __future__ import annotations

from typing import Any

from exporter.deps import require
from exporter.layouts import Dense, LayerNorm, PackedAttention
from exporter.models.registry import ModelSpec, TensorSpec, register

D_MODEL, HEADS, D_MLP = 32, 4, 64
LN_EPS = 1e-5


def build_torch() -> Any:
    """The torch build (``torch.nn.Module``)."""
    torch = require("torch", "the torch build of model 'transformer'")
    nn = torch.nn

    class EncoderBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(D_MODEL, eps=LN_EPS)
            self.attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
            self.ln2 = nn.LayerNorm(D_MODEL, eps=LN_EPS)
            self.fc1 = nn.Linear(D_MODEL, D_MLP)
            self.fc2 = nn.Linear(D_MLP, D_MODEL)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    return EncoderBlock()


def build_flax() -> Any:
    """The flax build (``flax.linen.Module``)."""
    nn = require("flax.linen", "the flax build of model 'transformer'")

    class EncoderBlock(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = nn.LayerNorm(epsilon=LN_EPS, name="ln1")(x)
            x = x + nn.MultiHeadDotProductAttention(
                num_heads=HEADS, qkv_features=D_MODEL, out_features=D_MODEL, name="attn"
            )(h)
            h = nn.LayerNorm(epsilon=LN_EPS, name="ln2")(x)
            h = nn.gelu(nn.Dense(D_MLP, name="fc1")(h), approximate=False)
            return x + nn.Dense(D_MODEL, name="fc2")(h)

    return EncoderBlock()


SPEC = register(
    ModelSpec(
        name="transformer",
        summary="pre-LayerNorm encoder block: 4-head self-attention + GELU MLP, d_model 32",
        inputs=(TensorSpec("x", ("batch", "seq", D_MODEL), "float32", low=-1.0, high=1.0),),
        outputs=("y",),
        output_kinds={"y": "hidden"},
        layout=(
            LayerNorm("ln1", "ln1"),
            PackedAttention("attn", "attn", heads=HEADS),
            LayerNorm("ln2", "ln2"),
            Dense("fc1", "fc1"),
            Dense("fc2", "fc2"),
        ),
        torch_factory=build_torch,
        flax_factory=build_flax,
        dims={"batch": 2, "seq": 5},
        sweep_dims={"seq": (1, 5, 17)},  # a seq length baked into a Reshape fails too
    )
)
