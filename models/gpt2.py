"""``gpt2``: the GPT-2 decoder with a KV cache, in torch and flax, sized by a config.

Architecture (Hugging Face ``GPT2LMHeadModel``): token + learned position embeddings,
``n_layer`` pre-LayerNorm blocks (causal self-attention, MLP with ``activation_function``),
a final LayerNorm and the LM head tied to the token embedding.  The torch module's
``state_dict()`` names are Hugging Face's (``transformer.h.0.attn.c_attn.weight``, with
``Conv1D``'s ``(in, out)`` layout, ``transformer.wte.weight``, ...), so a checkpoint that
``transformers`` saved loads through the normal strict path:

* ``lm_head.weight`` is the token embedding itself (tied, as in HF; ``save_pretrained``
  leaves it out of ``model.safetensors``), so it is not a parameter of its own: an
  ``ignore_keys`` entry drops it where a checkpoint carries it (older ``.bin`` files);
* ``attn.bias`` / ``attn.masked_bias`` (the causal-mask buffers older ``transformers``
  wrote) are dropped the same way;
* checkpoints of ``GPT2Model`` (no ``transformer.`` prefix: ``h.0.attn...``, ``wte.weight``,
  the original OpenAI upload) get the prefix through ``key_rules``.

Serving signature (the names Optimum and onnxruntime-genai use)::

    input_ids                      int64   [batch, seq]
    attention_mask                 int64   [batch, past + seq]   1 = real token, 0 = padding
    past_key_values.<i>.key/value  float32 [batch, n_head, past, head_dim]
    -> logits                      float32 [batch, seq, vocab_size]
       present.<i>.key/value       float32 [batch, n_head, past + seq, head_dim]

One graph serves the prefill (``past`` = 0: empty past tensors) and every decode step
(``past`` >= 1).  ``torch.export`` specialises dims whose *example* size is 0 or 1, so the
export traces at ``past`` = 4 and ``seq`` = 8; the ONNX graph carries no guard on those
sizes, and the parity sweep runs it at ``past`` 0, 1 and larger (tested).  The attention
mask is a dim expression (``"past + seq"``, see ``exporter.dimexpr``): its length is the
cached plus the new positions.

Position ids come from the attention mask as in ``transformers``' ``generate``
(``cumsum(mask) - 1``, 1 at padded positions), so left-padded batches decode like
unpadded ones.  A query attends to the keys that are neither in its future nor padding,
and always to itself: a padded query (whose every key is padding) then gives finite,
well-conditioned values that nobody reads, instead of a softmax over nothing.  Logits and
present values at padded positions are therefore not HF's (whose are meaningless too);
at real positions they are.

Config fields are ``GPT2Config``'s names; a field a ``config.json`` leaves out takes
``GPT2Config``'s default.  Without a config the family's default is a small GPT-2
(2 layers, 64 wide, 4 heads, 1000-token vocabulary, 128 positions) that keeps the test
sweep cheap; a real GPT-2 comes with its checkpoint's ``config.json``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from exporter.errors import UsageError
from exporter.hf_layouts import Conv1D
from exporter.layouts import Embedding, LayerNorm, Rule
from exporter.models.family import Family, FamilySpec, Field
from exporter.models.registry import TensorSpec

__all__ = ["FAMILY", "SPEC", "ACTIVATIONS", "input_names", "output_names"]

#: ``activation_function`` values the builds implement -> (torch, flax) implementation.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")

FIELDS = (
    Field("vocab_size", int, help="tokens in the vocabulary", minimum=1),
    Field("n_positions", int, help="longest sequence (learned position embeddings)", minimum=1),
    Field("n_embd", int, help="hidden width", minimum=1),
    Field("n_layer", int, help="decoder blocks", minimum=1),
    Field("n_head", int, help="attention heads (must divide n_embd)", minimum=1),
    Field("n_inner", int, None, "MLP width; null: 4 * n_embd", minimum=1, nullable=True),
    Field("activation_function", str, "gelu_new", "MLP activation", choices=ACTIVATIONS),
    Field("layer_norm_epsilon", float, 1e-5, "LayerNorm epsilon", minimum=0.0, exclusive_minimum=True),
    Field("initializer_range", float, 0.02, "std of the seeded initial weights", minimum=0.0, exclusive_minimum=True),
    Field("tie_word_embeddings", bool, True, "LM head tied to the token embedding", choices=(True,)),
    Field("scale_attn_weights", bool, True, "scores divided by sqrt(head_dim)", choices=(True,)),
    Field("scale_attn_by_inverse_layer_idx", bool, False, "extra 1/(layer+1) score scaling", choices=(False,)),
    Field("reorder_and_upcast_attn", bool, False, "mixed-precision attention variant", choices=(False,)),
    Field("add_cross_attention", bool, False, "encoder-decoder cross attention", choices=(False,)),
    Field("model_type", str, "gpt2", "Hugging Face model type", choices=("gpt2",)),
)

#: The default config: small, so the registry-wide sweeps stay cheap.
DEFAULT_CONFIG = {"vocab_size": 1000, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 4}


def _check(values: Mapping[str, Any]) -> list[str]:
    if values["n_embd"] % values["n_head"]:
        return [f"field 'n_embd' ({values['n_embd']}) is not divisible by 'n_head' ({values['n_head']})"]
    return []


def input_names(n_layer: int) -> list[str]:
    """``input_ids``, ``attention_mask``, ``past_key_values.<i>.key``/``.value`` for each layer."""
    return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def output_names(n_layer: int) -> list[str]:
    """``logits``, ``present.<i>.key``/``.value`` for each layer."""
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


@dataclass(frozen=True)
class _Dims:
    vocab: int
    positions: int
    embd: int
    layers: int
    heads: int
    inner: int
    act: str
    eps: float
    init_std: float

    @property
    def head_dim(self) -> int:
        return self.embd // self.heads

    @classmethod
    def of(cls, c: Mapping[str, Any]) -> _Dims:
        return cls(
            vocab=c["vocab_size"],
            positions=c["n_positions"],
            embd=c["n_embd"],
            layers=c["n_layer"],
            heads=c["n_head"],
            inner=c["n_inner"] or 4 * c["n_embd"],
            act=c["activation_function"],
            eps=c["layer_norm_epsilon"],
            init_std=c["initializer_range"],
        )


# ------------------------------------------------------------------------------------
# torch build
# ------------------------------------------------------------------------------------
def _torch_build(c: _Dims) -> Any:
    import torch
    from torch import nn

    E, H, D = c.embd, c.heads, c.head_dim

    def act(x: torch.Tensor) -> torch.Tensor:
        if c.act == "relu":
            return torch.relu(x)
        return torch.nn.functional.gelu(x, approximate="none" if c.act == "gelu" else "tanh")

    class HFConv1D(nn.Module):
        """``transformers``' Conv1D: ``x @ weight + bias``, weight (in, out)."""

        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(n_in, n_out))
            self.bias = nn.Parameter(torch.zeros(n_out))
            nn.init.normal_(self.weight, std=c.init_std)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = HFConv1D(E, 3 * E)
            self.c_proj = HFConv1D(E, E)

        def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, keep: torch.Tensor) -> Any:
            b, s, _ = x.shape
            q, k, v = self.c_attn(x).split(E, dim=2)

            def heads(t: torch.Tensor) -> torch.Tensor:  # (B, S, E) -> (B, H, S, D)
                return t.reshape(b, s, H, D).transpose(1, 2)

            k = torch.cat([past_k, heads(k)], dim=2)
            v = torch.cat([past_v, heads(v)], dim=2)
            # As HF's eager attention: the product first, then the division.
            scores = (heads(q) @ k.transpose(-1, -2)) / math.sqrt(D)
            scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
            ctx = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, E)
            return self.c_proj(ctx), k, v

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = HFConv1D(E, c.inner)
            self.c_proj = HFConv1D(c.inner, E)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_proj(act(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(E, eps=c.eps)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(E, eps=c.eps)
            self.mlp = MLP()

        def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, keep: torch.Tensor) -> Any:
            a, k, v = self.attn(self.ln_1(x), past_k, past_v, keep)
            x = x + a
            return x + self.mlp(self.ln_2(x)), k, v

    class Transformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(c.vocab, E)
            self.wpe = nn.Embedding(c.positions, E)
            self.h = nn.ModuleList([Block() for _ in range(c.layers)])
            self.ln_f = nn.LayerNorm(E, eps=c.eps)
            nn.init.normal_(self.wte.weight, std=c.init_std)
            nn.init.normal_(self.wpe.weight, std=c.init_std)

    class GPT2LMHeadModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = Transformer()
            self.lm_head = nn.Linear(E, c.vocab, bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in HF

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            t = self.transformer
            s = input_ids.shape[1]
            p = past[0].shape[2]
            pos = torch.cumsum(attention_mask, dim=-1) - 1
            pos = pos.masked_fill(attention_mask == 0, 1)[:, p:]
            x = t.wte(input_ids) + t.wpe(pos)
            kpos = torch.arange(p + s, device=input_ids.device)
            qpos = kpos[p:]
            causal = kpos[None, :] <= qpos[:, None]  # (S, T)
            keep = causal[None, None] & (attention_mask != 0)[:, None, None, :]
            keep = keep | (kpos[None, :] == qpos[:, None])[None, None]  # a query always sees itself
            presents: list[torch.Tensor] = []
            for i, block in enumerate(t.h):
                x, k, v = block(x, past[2 * i], past[2 * i + 1], keep)
                presents += [k, v]
            return (self.lm_head(t.ln_f(x)), *presents)

    # torch.export binds example inputs (and dynamic_shapes) to forward's parameters by
    # name; give the variadic past one parameter per tensor.
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)]
    params += [P(n.replace(".", "_"), P.POSITIONAL_OR_KEYWORD) for n in input_names(c.layers)]
    GPT2LMHeadModel.forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return GPT2LMHeadModel().eval()


# ------------------------------------------------------------------------------------
# flax build
# ------------------------------------------------------------------------------------
def _flax_build(c: _Dims) -> Any:
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    E, H, D = c.embd, c.heads, c.head_dim
    init = nn.initializers.normal(stddev=c.init_std)

    def act(x: Any) -> Any:
        if c.act == "relu":
            return nn.relu(x)
        return nn.gelu(x, approximate=c.act != "gelu")

    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x: Any, past_k: Any, past_v: Any, keep: Any) -> Any:
            b, s = x.shape[0], x.shape[1]
            qkv = nn.Dense(3 * E, kernel_init=init, name="c_attn")(x)
            q, k, v = qkv[..., :E], qkv[..., E : 2 * E], qkv[..., 2 * E :]

            def heads(t: Any) -> Any:
                return t.reshape(b, s, H, D).transpose(0, 2, 1, 3)

            # lax.concatenate, not jnp.concatenate: jax2onnx 0.17.1's jnp.concatenate gives
            # its result the first operand's symbolic length ("past", not "seq + past").
            k = jax.lax.concatenate([past_k, heads(k)], 2)
            v = jax.lax.concatenate([past_v, heads(v)], 2)
            scores = (heads(q) @ k.transpose(0, 1, 3, 2)) / math.sqrt(D)
            scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
            ctx = (nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, s, E)
            return nn.Dense(E, kernel_init=init, name="c_proj")(ctx), k, v

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = act(nn.Dense(c.inner, kernel_init=init, name="c_fc")(x))
            return nn.Dense(E, kernel_init=init, name="c_proj")(h)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: Any, past_k: Any, past_v: Any, keep: Any) -> Any:
            a, k, v = Attention(name="attn")(nn.LayerNorm(epsilon=c.eps, name="ln_1")(x), past_k, past_v, keep)
            x = x + a
            return x + MLP(name="mlp")(nn.LayerNorm(epsilon=c.eps, name="ln_2")(x)), k, v

    class GPT2LMHeadModel(nn.Module):
        """Flax twin of the torch build; same inputs and outputs in the same order."""

        @nn.compact
        def __call__(self, input_ids: Any, attention_mask: Any, *past: Any) -> tuple[Any, ...]:
            wte = nn.Embed(c.vocab, E, embedding_init=init, name="wte")
            wpe = nn.Embed(c.positions, E, embedding_init=init, name="wpe")
            p = past[0].shape[2]
            pos = jnp.cumsum(attention_mask, axis=-1) - 1
            # lax.slice_in_dim, not x[:, p:]: jax2onnx 0.17.1 lowers that indexing to a
            # gather that needs a constant slice size.
            pos = jax.lax.slice_in_dim(jnp.where(attention_mask == 0, 1, pos), p, None, axis=1)
            x = wte(input_ids) + wpe(pos)
            # Key positions 0..T-1 from the mask's own length (not jnp.arange: under
            # jax2onnx's symbolic dims an arange loses its link to them).
            kpos = jnp.cumsum(jnp.ones_like(attention_mask[0]), axis=0) - 1
            qpos = jax.lax.slice_in_dim(kpos, p, None, axis=0)
            causal = kpos[None, :] <= qpos[:, None]
            keep = causal[None, None] & (attention_mask != 0)[:, None, None, :]
            keep = keep | (kpos[None, :] == qpos[:, None])[None, None]
            presents: list[Any] = []
            for i in range(c.layers):
                x, k, v = Block(name=f"h_{i}")(x, past[2 * i], past[2 * i + 1], keep)
                presents += [k, v]
            x = nn.LayerNorm(epsilon=c.eps, name="ln_f")(x)
            return (wte.attend(x), *presents)

    return GPT2LMHeadModel()


# ------------------------------------------------------------------------------------
# layout and spec
# ------------------------------------------------------------------------------------
def _layout(c: _Dims) -> tuple[Rule, ...]:
    rules: list[Rule] = [
        Embedding("transformer.wte", "wte"),
        Embedding("transformer.wpe", "wpe"),
        LayerNorm("transformer.ln_f", "ln_f"),
    ]
    for i in range(c.layers):
        t, f = f"transformer.h.{i}", f"h_{i}"
        rules += [
            LayerNorm(f"{t}.ln_1", f"{f}/ln_1"),
            Conv1D(f"{t}.attn.c_attn", f"{f}/attn/c_attn"),
            Conv1D(f"{t}.attn.c_proj", f"{f}/attn/c_proj"),
            LayerNorm(f"{t}.ln_2", f"{f}/ln_2"),
            Conv1D(f"{t}.mlp.c_fc", f"{f}/mlp/c_fc"),
            Conv1D(f"{t}.mlp.c_proj", f"{f}/mlp/c_proj"),
        ]
    return tuple(rules)


@dataclass(frozen=True)
class GPT2Spec(FamilySpec):
    """A GPT-2 spec whose example inputs are left-padded, with a past of any length."""

    def generation_prompts(self, seed: int = 0) -> list[Any]:
        """The prompt sets of its generation parity check (``exporter.generation``): batch 1,
        2 and 7, left-padded prompts of up to 16 tokens, 32 new tokens each."""
        from exporter import generation

        c = _Dims.of(self.config)
        longest = min(generation.DEFAULT_MAX_PROMPT, max(1, c.positions // 3))
        new = min(generation.DEFAULT_NEW_TOKENS, c.positions - longest)
        return generation.default_prompts(c.vocab, c.positions, new_tokens=new, max_prompt=longest, seed=seed)

    def example_inputs(self, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded ids, a left-padded mask over past + new positions, and past keys/values.

        Row 0 is unpadded; every other row keeps between 1 and ``past + seq`` real
        positions at the end (left padding, as batched generation has it).  The same
        (dims, seed) gives bit-identical arrays.

        Raises:
            UsageError: ``batch`` or ``seq`` < 1, ``past`` < 0, or ``past + seq`` over ``n_positions``.
        """
        sizes = {**self.dims, **(dims or {})}
        c = _Dims.of(self.config)
        batch, seq, past = int(sizes["batch"]), int(sizes["seq"]), int(sizes["past"])
        problems = []
        if batch < 1 or seq < 1 or past < 0:
            problems.append(f"batch and seq must be >= 1 and past >= 0, got batch={batch}, seq={seq}, past={past}")
        if past + seq > c.positions:
            problems.append(f"past + seq = {past + seq} is over n_positions = {c.positions} (position embeddings)")
        if problems:
            raise UsageError.listing(f"model {self.name!r}: bad example dims", problems)
        rng = np.random.default_rng(seed)
        total = past + seq
        ids = rng.integers(0, c.vocab, size=(batch, seq), dtype=np.int64)
        keep = rng.integers(1, total + 1, size=batch)
        keep[0] = total
        mask = (np.arange(total)[None, :] >= (total - keep)[:, None]).astype(np.int64)
        ids = np.where(mask[:, past:] == 1, ids, 0).astype(np.int64)
        out: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        for name in input_names(c.layers)[2:]:
            out[name] = rng.uniform(-1.0, 1.0, size=(batch, c.heads, past, c.head_dim)).astype(np.float32)
        return out


def _make_spec(name: str, config: Mapping[str, Any]) -> GPT2Spec:
    c = _Dims.of(config)
    past_shape = ("batch", c.heads, "past", c.head_dim)
    inputs = (
        TensorSpec("input_ids", ("batch", "seq"), "int64", 0, c.vocab),
        TensorSpec("attention_mask", ("batch", "past + seq"), "int64", 0, 2),
        *(TensorSpec(n, past_shape, "float32", -1.0, 1.0) for n in input_names(c.layers)[2:]),
    )
    return GPT2Spec(
        name=name,
        summary=(
            f"GPT-2 decoder with KV cache ({c.layers} layers, {c.embd} wide, {c.heads} heads, "
            f"vocab {c.vocab}, {c.positions} positions; HF GPT2LMHeadModel names)"
        ),
        inputs=inputs,
        outputs=tuple(output_names(c.layers)),
        output_kinds={"logits": "logits", **{n: "hidden" for n in output_names(c.layers)[1:]}},
        layout=_layout(c),
        torch_factory=lambda: _torch_build(c),
        flax_factory=lambda: _flax_build(c),
        # Traced at past 4 and seq 8 (torch.export specialises example sizes 0 and 1); the
        # sweep runs the prefill (past 0), one cached position and longer caches, with a
        # single new token (decode) and several.
        dims={"batch": 2, "seq": 8, "past": 4},
        min_dims={"past": 0},
        sweep_dims={"seq": (1, 7), "past": (0, 1, 17)},
        ignore_keys=(
            r"^lm_head\.weight$",  # tied to transformer.wte.weight
            r"(^|\.)attn\.(masked_)?bias$",  # causal-mask buffers of older transformers
        ),
        key_rules=((r"^(?=(h\.\d+|wte|wpe|ln_f)\.)", "transformer."),),  # GPT2Model checkpoints
        family="gpt2",
        config=dict(config),
    )


FAMILY = Family(
    name="gpt2",
    summary="GPT-2 decoder with KV cache (HF GPT2LMHeadModel layout); sized by a GPT2Config config.json",
    fields=FIELDS,
    make_spec=_make_spec,
    default=DEFAULT_CONFIG,
    check=_check,
)

SPEC = FAMILY.register()
