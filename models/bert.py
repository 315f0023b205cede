"""``bert``: a BERT encoder with mean pooling, in torch and flax, sized by a ``BertConfig``.

The architecture of ``minilm`` (which is this family's all-MiniLM-L6-v2 config, see
:data:`MINILM_CONFIG`), for any depth and width: Hugging Face ``BertModel`` (word +
token-type + position embeddings, LayerNorm, ``num_hidden_layers`` post-LayerNorm encoder
layers) followed by sentence-transformers' masked mean pooling and L2 normalisation.

Inputs ``input_ids``, ``attention_mask`` (int64 ``[batch, seq]``, seq <= the config's
``max_position_embeddings``); outputs ``sentence_embedding`` (normalised mean of the last
hidden states over the mask) and ``last_hidden_state``.  ``token_type_ids`` are not an
input: a sentence embedding always uses segment 0, so both builds add row 0 of the
token-type embeddings (bit-identical to looking up an all-zero ``token_type_ids``).

Padding: key positions with ``attention_mask == 0`` get the score ``finfo(float32).min``
(a ``where``, as flax's ``MultiHeadDotProductAttention`` does), so their softmax weight is
exactly 0 in both frameworks and in the ONNX exports.  ``last_hidden_state`` is zero at
padded positions: what BERT computes there depends only on the ``[PAD]`` embedding, nobody
reads it, and it is ill-conditioned (measured on all-MiniLM-L6-v2's real weights: torch vs
onnxruntime differ by up to 1e-4 at padded positions, 6e-6 at real tokens).  A row whose
mask is all zeros gets all-zero outputs; example inputs never make one.

The torch module's ``state_dict()`` names are ``BertModel``'s, so a checkpoint that
``transformers`` saved loads through the strict path: the ``pooler.*`` head and the
``position_ids`` / ``token_type_ids`` buffers are ignored keys, and the ``bert.`` prefix
of task models (``BertForMaskedLM``, ``BertForSequenceClassification``) is stripped by a
key rule; their task heads (``cls.*``, ``classifier.*``) are then unexpected keys, named
in the error (pass ``--rename`` rules or export the base model's weights).

Config fields are ``BertConfig``'s names; the size fields are required, the others take
``BertConfig``'s defaults.  Without a config the family's default is BERT-tiny
(``google/bert_uncased_L-2_H-128_A-2``'s config: 2 layers, 128 wide, 2 heads).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from exporter.deps import require
from exporter.errors import UsageError
from exporter.layouts import Attention, Dense, Embedding, LayerNorm, Rule
from exporter.models.family import Family, FamilySpec, Field
from exporter.models.registry import TensorSpec

__all__ = ["FAMILY", "SPEC", "MINILM_CONFIG", "TINY_CONFIG", "ACTIVATIONS"]

NORM_EPS = 1e-12  # torch.nn.functional.normalize's default eps
POOL_EPS = 1e-9  # sentence-transformers clamps the token count to >= 1e-9

#: ``hidden_act`` values the builds implement.
ACTIVATIONS = ("gelu", "gelu_new", "relu")

FIELDS = (
    Field("vocab_size", int, help="tokens in the vocabulary", minimum=1),
    Field("hidden_size", int, help="hidden width", minimum=1),
    Field("num_hidden_layers", int, help="encoder layers", minimum=1),
    Field("num_attention_heads", int, help="attention heads (must divide hidden_size)", minimum=1),
    Field("intermediate_size", int, help="feed-forward width", minimum=1),
    Field("max_position_embeddings", int, help="longest sequence", minimum=1),
    Field("type_vocab_size", int, 2, "token-type (segment) embeddings", minimum=1),
    Field("layer_norm_eps", float, 1e-12, "LayerNorm epsilon", minimum=0.0, exclusive_minimum=True),
    Field("hidden_act", str, "gelu", "feed-forward activation", choices=ACTIVATIONS),
    Field("pad_token_id", int, 0, "id at padded positions of example inputs", minimum=0),
    Field("position_embedding_type", str, "absolute", "position embeddings", choices=("absolute",)),
    Field("is_decoder", bool, False, "causal (decoder) attention", choices=(False,)),
    Field("add_cross_attention", bool, False, "encoder-decoder cross attention", choices=(False,)),
    Field("model_type", str, "bert", "Hugging Face model type", choices=("bert",)),
)

#: sentence-transformers' all-MiniLM-L6-v2 (the ``config.json`` its checkpoint ships).
MINILM_CONFIG: Mapping[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}

#: BERT-tiny (``google/bert_uncased_L-2_H-128_A-2``): the family's default, cheap to sweep.
TINY_CONFIG: Mapping[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 512,
}


def _check(values: Mapping[str, Any]) -> list[str]:
    if values["hidden_size"] % values["num_attention_heads"]:
        return [f"field 'hidden_size' ({values['hidden_size']}) is not divisible by 'num_attention_heads' ({values['num_attention_heads']})"]
    if values["pad_token_id"] >= values["vocab_size"]:
        return [f"field 'pad_token_id' ({values['pad_token_id']}) is not a token id (vocab_size {values['vocab_size']})"]
    return []


@dataclass(frozen=True)
class _Dims:
    vocab: int
    hidden: int
    layers: int
    heads: int
    inner: int
    positions: int
    types: int
    eps: float
    act: str
    pad: int

    @classmethod
    def of(cls, c: Mapping[str, Any]) -> _Dims:
        return cls(
            vocab=c["vocab_size"],
            hidden=c["hidden_size"],
            layers=c["num_hidden_layers"],
            heads=c["num_attention_heads"],
            inner=c["intermediate_size"],
            positions=c["max_position_embeddings"],
            types=c["type_vocab_size"],
            eps=c["layer_norm_eps"],
            act=c["hidden_act"],
            pad=c["pad_token_id"],
        )


# ------------------------------------------------------------------------------------
# torch build
# ------------------------------------------------------------------------------------
def _torch_build(c: _Dims) -> Any:
    torch = require("torch", "the torch build of the bert family")
    nn = torch.nn
    H = c.hidden

    def act(x: Any) -> Any:
        if c.act == "relu":
            return torch.relu(x)
        return torch.nn.functional.gelu(x, approximate="tanh" if c.act == "gelu_new" else "none")

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(c.vocab, H)
            self.position_embeddings = nn.Embedding(c.positions, H)
            self.token_type_embeddings = nn.Embedding(c.types, H)
            self.LayerNorm = nn.LayerNorm(H, eps=c.eps)

        def forward(self, input_ids: Any) -> Any:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            # Same addition order as HF BertEmbeddings: (word + token type) + position.
            x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
            x = x + self.position_embeddings(positions)
            return self.LayerNorm(x)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(H, H)
            self.key = nn.Linear(H, H)
            self.value = nn.Linear(H, H)

    class AttentionOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(H, H)
            self.LayerNorm = nn.LayerNorm(H, eps=c.eps)

    class BertAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self = SelfAttention()
            self.output = AttentionOutput()

        def forward(self, x: Any, keep: Any) -> Any:
            b, s, _ = x.shape
            d = H // c.heads

            def heads(t: Any) -> Any:  # (B, S, E) -> (B, H, S, D)
                return t.reshape(b, s, c.heads, d).transpose(1, 2)

            # Scale q before the product, as flax's dot_product_attention does.
            q = heads(self.self.query(x)) / (d**0.5)
            k = heads(self.self.key(x))
            v = heads(self.self.value(x))
            scores = q @ k.transpose(-1, -2)  # (B, H, S, S)
            scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
            ctx = torch.softmax(scores, dim=-1) @ v  # (B, H, S, D)
            ctx = ctx.transpose(1, 2).reshape(b, s, H)
            return self.output.LayerNorm(self.output.dense(ctx) + x)

    class Intermediate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(H, c.inner)

    class Output(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(c.inner, H)
            self.LayerNorm = nn.LayerNorm(H, eps=c.eps)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = BertAttention()
            self.intermediate = Intermediate()
            self.output = Output()

        def forward(self, x: Any, keep: Any) -> Any:
            x = self.attention(x, keep)
            h = act(self.intermediate.dense(x))
            return self.output.LayerNorm(self.output.dense(h) + x)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList([Layer() for _ in range(c.layers)])

    class Bert(nn.Module):
        """HF BertModel (no pooler) + masked mean pooling + L2 normalisation."""

        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()

        def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
            keep = (attention_mask != 0)[:, None, None, :]  # (B, 1, 1, S) key mask
            x = self.embeddings(input_ids)
            for layer in self.encoder.layer:
                x = layer(x, keep)
            m = attention_mask.to(x.dtype)[:, :, None]
            x = x * m  # padded positions -> 0
            pooled = x.sum(dim=1) / torch.clamp(m.sum(dim=1), min=POOL_EPS)
            norm = torch.sqrt((pooled * pooled).sum(dim=-1, keepdim=True))
            emb = pooled / torch.clamp(norm, min=NORM_EPS)
            return emb, x

    return Bert().eval()


# ------------------------------------------------------------------------------------
# flax build
# ------------------------------------------------------------------------------------
def _flax_build(c: _Dims) -> Any:
    jnp = require("jax.numpy", "the flax build of the bert family")
    nn = require("flax.linen", "the flax build of the bert family")
    H = c.hidden

    def act(x: Any) -> Any:
        if c.act == "relu":
            return nn.relu(x)
        return nn.gelu(x, approximate=c.act == "gelu_new")

    class Embeddings(nn.Module):
        @nn.compact
        def __call__(self, input_ids: Any) -> Any:
            word = nn.Embed(c.vocab, H, name="word_embeddings")
            pos = nn.Embed(c.positions, H, name="position_embeddings")
            tok = nn.Embed(c.types, H, name="token_type_embeddings")
            # (B, S) positions 0..S-1.  Not jnp.arange(S): under jax2onnx's symbolic S an
            # arange loses its link to S and the add below fails to broadcast.
            positions = jnp.cumsum(jnp.ones_like(input_ids), axis=1) - 1
            x = word(input_ids) + tok.embedding[0]
            x = x + pos(positions)
            return nn.LayerNorm(epsilon=c.eps, name="LayerNorm")(x)

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x: Any, keep: Any) -> Any:
            a = nn.MultiHeadDotProductAttention(
                num_heads=c.heads,
                qkv_features=H,
                out_features=H,
                dropout_rate=0.0,
                deterministic=True,
                name="attention",
            )(x, mask=keep)
            x = nn.LayerNorm(epsilon=c.eps, name="attention_LayerNorm")(a + x)
            h = act(nn.Dense(c.inner, name="intermediate")(x))
            return nn.LayerNorm(epsilon=c.eps, name="output_LayerNorm")(nn.Dense(H, name="output")(h) + x)

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x: Any, keep: Any) -> Any:
            for i in range(c.layers):
                x = Layer(name=f"layer_{i}")(x, keep)
            return x

    class Bert(nn.Module):
        """Flax twin of the torch build; same outputs in the same order."""

        @nn.compact
        def __call__(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
            keep = jnp.expand_dims(attention_mask != 0, (1, 2))  # (B, 1, 1, S) key mask
            x = Embeddings(name="embeddings")(input_ids)
            x = Encoder(name="encoder")(x, keep)
            m = jnp.expand_dims(attention_mask.astype(x.dtype), 2)
            x = x * m  # padded positions -> 0
            pooled = x.sum(axis=1) / jnp.maximum(m.sum(axis=1), POOL_EPS)
            norm = jnp.sqrt((pooled * pooled).sum(axis=-1, keepdims=True))
            emb = pooled / jnp.maximum(norm, NORM_EPS)
            return emb, x

    return Bert()


# ------------------------------------------------------------------------------------
# layout and spec
# ------------------------------------------------------------------------------------
def _layout(c: _Dims) -> tuple[Rule, ...]:
    rules: list[Rule] = [
        Embedding("embeddings.word_embeddings", "embeddings/word_embeddings"),
        Embedding("embeddings.position_embeddings", "embeddings/position_embeddings"),
        Embedding("embeddings.token_type_embeddings", "embeddings/token_type_embeddings"),
        LayerNorm("embeddings.LayerNorm", "embeddings/LayerNorm"),
    ]
    for i in range(c.layers):
        t, f = f"encoder.layer.{i}", f"encoder/layer_{i}"
        rules += [
            Attention(
                f"{t}.attention",
                f"{f}/attention",
                query=f"{t}.attention.self.query",
                key=f"{t}.attention.self.key",
                value=f"{t}.attention.self.value",
                out=f"{t}.attention.output.dense",
                heads=c.heads,
            ),
            LayerNorm(f"{t}.attention.output.LayerNorm", f"{f}/attention_LayerNorm"),
            Dense(f"{t}.intermediate.dense", f"{f}/intermediate"),
            Dense(f"{t}.output.dense", f"{f}/output"),
            LayerNorm(f"{t}.output.LayerNorm", f"{f}/output_LayerNorm"),
        ]
    return tuple(rules)


@dataclass(frozen=True)
class BertSpec(FamilySpec):
    """A BERT spec whose example inputs look like tokenised, right-padded text."""

    def example_inputs(self, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded token ids in ``[0, vocab)`` and right-padded masks.

        Every row keeps between 1 and ``seq`` tokens (row 0 keeps all of them, so the
        longest row fills the batch as a tokenizer's padding would); padded positions hold
        ``pad_token_id``.  The same (dims, seed) gives bit-identical arrays.

        Raises:
            UsageError: ``seq`` outside ``[1, max_position_embeddings]`` or ``batch`` < 1.
        """
        c = _Dims.of(self.config)
        sizes = {**self.dims, **(dims or {})}
        batch, seq = int(sizes["batch"]), int(sizes["seq"])
        if not 1 <= seq <= c.positions:
            raise UsageError(f"model {self.name!r}: seq must be in [1, {c.positions}] (position embeddings), got {seq}")
        if batch < 1:
            raise UsageError(f"model {self.name!r}: batch must be >= 1, got {batch}")
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, c.vocab, size=(batch, seq), dtype=np.int64)
        lengths = rng.integers(1, seq + 1, size=batch)
        lengths[0] = seq
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        ids = np.where(mask == 1, ids, c.pad).astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask}


def _make_spec(name: str, config: Mapping[str, Any]) -> BertSpec:
    c = _Dims.of(config)
    return BertSpec(
        name=name,
        summary=f"BERT encoder + mean pooling ({c.layers} layers, {c.hidden} wide, {c.heads} heads, vocab {c.vocab}; HF BertModel names)",
        inputs=(
            TensorSpec("input_ids", ("batch", "seq"), "int64", 0, c.vocab),
            TensorSpec("attention_mask", ("batch", "seq"), "int64", 0, 2),
        ),
        outputs=("sentence_embedding", "last_hidden_state"),
        output_kinds={"sentence_embedding": "embedding", "last_hidden_state": "hidden"},
        layout=_layout(c),
        torch_factory=lambda: _torch_build(c),
        flax_factory=lambda: _flax_build(c),
        dims={"batch": 2, "seq": 16},
        # The sweep crosses these with the batch sizes; rows are right-padded (see
        # example_inputs), so every case but seq=1 has padding in the attention mask.
        sweep_dims={"seq": tuple(s for s in (1, 16, 64) if s <= c.positions)},
        ignore_keys=(
            r"(^|\.)num_batches_tracked$",
            r"^embeddings\.position_ids$",  # HF buffer arange(max_positions), not a parameter
            r"^embeddings\.token_type_ids$",  # HF buffer of zeros, not a parameter
            r"^pooler\.",  # BertPooler: unused by mean pooling
        ),
        key_rules=((r"^bert\.", ""),),  # task models (BertForMaskedLM, ...) nest BertModel as "bert"
        family="bert",
        config=dict(config),
    )


FAMILY = Family(
    name="bert",
    summary="BERT encoder + mean pooling (HF BertModel layout); sized by a BertConfig config.json",
    fields=FIELDS,
    make_spec=_make_spec,
    default=TINY_CONFIG,
    check=_check,
)

SPEC = FAMILY.register()
