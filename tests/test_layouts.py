"""torch <-> flax layout rules: shapes, bit-exact round trips, attention numerics."""
from __future__ import annotations

import numpy as np
import pytest

from exporter import layouts
from exporter.errors import StateMismatchError, UsageError
from exporter.layouts import Attention, BatchNorm, Conv, Dense, Embedding, LayerNorm, PackedAttention

E, H, D = 8, 2, 4  # embed, heads, head dim

RULE_CASES = {
    "dense": (Dense("fc", "fc"), {"fc.weight": (5, 3), "fc.bias": (5,)}, {"params/fc/kernel": (3, 5), "params/fc/bias": (5,)}),
    "dense-nobias": (Dense("a.b", "a/b", bias=False), {"a.b.weight": (5, 3)}, {"params/a/b/kernel": (3, 5)}),
    "conv": (
        Conv("c", "c"),
        {"c.weight": (6, 2, 3, 5), "c.bias": (6,)},
        {"params/c/kernel": (3, 5, 2, 6), "params/c/bias": (6,)},
    ),
    "batchnorm": (
        BatchNorm("bn", "bn"),
        {"bn.weight": (4,), "bn.bias": (4,), "bn.running_mean": (4,), "bn.running_var": (4,)},
        {"params/bn/scale": (4,), "params/bn/bias": (4,), "batch_stats/bn/mean": (4,), "batch_stats/bn/var": (4,)},
    ),
    "layernorm": (
        LayerNorm("ln", "ln"),
        {"ln.weight": (4,), "ln.bias": (4,)},
        {"params/ln/scale": (4,), "params/ln/bias": (4,)},
    ),
    "embedding": (Embedding("emb", "emb"), {"emb.weight": (11, 4)}, {"params/emb/embedding": (11, 4)}),
    "attention": (
        Attention("", "enc/attn", query="s.query", key="s.key", value="s.value", out="o.dense", heads=H),
        {
            **{f"s.{p}.weight": (E, E) for p in ("query", "key", "value")},
            **{f"s.{p}.bias": (E,) for p in ("query", "key", "value")},
            "o.dense.weight": (E, E),
            "o.dense.bias": (E,),
        },
        {
            **{f"params/enc/attn/{p}/kernel": (E, H, D) for p in ("query", "key", "value")},
            **{f"params/enc/attn/{p}/bias": (H, D) for p in ("query", "key", "value")},
            "params/enc/attn/out/kernel": (H, D, E),
            "params/enc/attn/out/bias": (E,),
        },
    ),
    "attention-default-prefixes": (
        Attention("blk.attn", "attn", heads=H, bias=False),
        {f"blk.attn.{p}.weight": (E, E) for p in ("query", "key", "value", "out")},
        {
            **{f"params/attn/{p}/kernel": (E, H, D) for p in ("query", "key", "value")},
            "params/attn/out/kernel": (H, D, E),
        },
    ),
    "packed-attention": (
        PackedAttention("attn", "attn", heads=H),
        {"attn.in_proj_weight": (3 * E, E), "attn.in_proj_bias": (3 * E,), "attn.out_proj.weight": (E, E), "attn.out_proj.bias": (E,)},
        {
            **{f"params/attn/{p}/kernel": (E, H, D) for p in ("query", "key", "value")},
            **{f"params/attn/{p}/bias": (H, D) for p in ("query", "key", "value")},
            "params/attn/out/kernel": (H, D, E),
            "params/attn/out/bias": (E,),
        },
    ),
}


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in sorted(shapes.items())}


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_rule_names_and_flax_shapes(case: str) -> None:
    rule, canon_shapes, flax_shapes = RULE_CASES[case]
    assert layouts.canonical_names([rule]) == sorted(canon_shapes)
    assert layouts.flax_names([rule]) == sorted(flax_shapes)
    flat = layouts.to_flax_flat(_random_state(canon_shapes), [rule])
    assert {k: v.shape for k, v in flat.items()} == flax_shapes
    assert all(v.flags.c_contiguous for v in flat.values())
    shapes = {k: (s, "float32") for k, s in canon_shapes.items()}
    assert layouts.flax_shapes(shapes, [rule]) == {k: (s, "float32") for k, s in flax_shapes.items()}


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_rule_round_trip_is_bit_exact(case: str, dtype: str) -> None:
    rule, canon_shapes, _ = RULE_CASES[case]
    canon = _random_state(canon_shapes, dtype=dtype)
    tree = layouts.to_flax(canon, [rule])
    back = layouts.from_flax(tree, [rule])
    assert sorted(back) == sorted(canon)
    for k in canon:
        assert back[k].dtype == canon[k].dtype
        assert back[k].tobytes() == canon[k].tobytes(), k
    # and the other way round: flax -> canonical -> flax
    flat = layouts.flatten_flax(tree)
    again = layouts.to_flax_flat(layouts.from_flax_flat(flat, [rule]), [rule])
    assert all(again[k].tobytes() == flat[k].tobytes() for k in flat)


def test_dense_and_conv_values_move_as_documented() -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)  # torch (out=2, in=3)
    flat = layouts.to_flax_flat({"l.weight": w, "l.bias": np.zeros(2, np.float32)}, [Dense("l", "l")])
    np.testing.assert_array_equal(flat["params/l/kernel"], w.T)
    cw = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # OIHW
    flat = layouts.to_flax_flat({"c.weight": cw}, [Conv("c", "c", bias=False)])
    k = flat["params/c/kernel"]  # HWIO
    assert k[1, 2, 0, 1] == cw[1, 0, 1, 2]


def test_packed_attention_equals_split_attention() -> None:
    """Packed in_proj rows [q; k; v] land in the same flax kernels as separate q/k/v Linears."""
    _, packed_shapes, _ = RULE_CASES["packed-attention"]
    packed = _random_state(packed_shapes, seed=3)
    w, b = packed["attn.in_proj_weight"], packed["attn.in_proj_bias"]
    split = {
        **{f"attn.{p}.weight": w[i * E : (i + 1) * E] for i, p in enumerate(("query", "key", "value"))},
        **{f"attn.{p}.bias": b[i * E : (i + 1) * E] for i, p in enumerate(("query", "key", "value"))},
        "attn.out.weight": packed["attn.out_proj.weight"],
        "attn.out.bias": packed["attn.out_proj.bias"],
    }
    a = layouts.to_flax_flat(packed, [PackedAttention("attn", "attn", heads=H)])
    b2 = layouts.to_flax_flat(split, [Attention("attn", "attn", heads=H)])
    assert sorted(a) == sorted(b2)
    for k in a:
        np.testing.assert_array_equal(a[k], b2[k])


def test_attention_rule_matches_flax_multihead_attention() -> None:
    """Separate torch q/k/v/out Linears (HF BERT style) computed by hand == flax MHDPA."""
    import flax.linen as nn
    import jax.numpy as jnp
    import torch

    rule = RULE_CASES["attention"][0]
    canon = _random_state(RULE_CASES["attention"][1], seed=1)
    x = np.random.default_rng(2).standard_normal((3, 5, E)).astype(np.float32)

    t = {k: torch.from_numpy(v) for k, v in canon.items()}
    xt = torch.from_numpy(x)

    def proj(p: str) -> torch.Tensor:
        y = torch.nn.functional.linear(xt, t[f"{p}.weight"], t[f"{p}.bias"])
        return y.view(3, 5, H, D).transpose(1, 2)  # (B, H, S, D)

    q, k, v = proj("s.query"), proj("s.key"), proj("s.value")
    att = torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1) @ v
    ctx = att.transpose(1, 2).reshape(3, 5, E)
    ref = torch.nn.functional.linear(ctx, t["o.dense.weight"], t["o.dense.bias"]).numpy()

    tree = layouts.to_flax(canon, [rule])
    mha = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=E, out_features=E)
    got = np.asarray(mha.apply({"params": tree["params"]["enc"]["attn"]}, jnp.asarray(x)))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_to_flax_lists_every_missing_and_unexpected_name() -> None:
    rules = [Dense("a", "a"), LayerNorm("ln", "ln")]
    canon = {"a.weight": np.zeros((2, 2), np.float32), "stray.weight": np.zeros(1, np.float32)}
    with pytest.raises(StateMismatchError) as info:
        layouts.to_flax(canon, rules)
    msg = str(info.value)
    for fragment in ("missing canonical key 'a.bias'", "missing canonical key 'ln.bias'",
                     "missing canonical key 'ln.weight'", "unexpected canonical key 'stray.weight'"):
        assert fragment in msg
    lines = msg.splitlines()[1:]
    assert lines == sorted(lines)


def test_from_flax_names_missing_flax_keys() -> None:
    with pytest.raises(StateMismatchError, match="missing flax key 'batch_stats/bn/var'"):
        layouts.from_flax({"params": {"bn": {"scale": np.ones(2), "bias": np.ones(2)}},
                           "batch_stats": {"bn": {"mean": np.ones(2)}}}, [BatchNorm("bn", "bn")])


def test_attention_heads_must_divide_width() -> None:
    with pytest.raises(UsageError, match="projection width 8 is not divisible by 3 heads; set the rule's heads="):
        layouts.to_flax_flat(_random_state(RULE_CASES["attention"][1]), [Attention("", "x", query="s.query", key="s.key",
                                                                                   value="s.value", out="o.dense", heads=3)])


def test_packed_attention_rows_must_split_in_three() -> None:
    state = {"attn.in_proj_weight": np.zeros((8, 4), np.float32), "attn.out_proj.weight": np.zeros((4, 4), np.float32)}
    with pytest.raises(UsageError, match="in_proj_weight has 8 rows, not divisible by 3"):
        layouts.to_flax_flat(state, [PackedAttention("attn", "attn", heads=2, bias=False)])


def test_overlapping_rules_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"canonical name 'a.weight' is owned by two rules: Dense\(torch='a', flax='a'") as info:
        layouts.canonical_names([Dense("a", "a"), Dense("a", "b")])
    assert "canonical name 'a.bias' is owned by two rules" in str(info.value)
    assert len(info.value.problems) == 2
    with pytest.raises(UsageError, match="flax key 'params/x/kernel' is owned by two rules"):
        layouts.flax_names([Dense("a", "x"), Dense("b", "x")])
    with pytest.raises(UsageError, match="layout entry 1 is not an exporter.layouts.Rule: tuple"):
        layouts.canonical_names([Dense("a", "a"), ("b", "b")])  # type: ignore[list-item]
    assert layouts.rule_problems([Dense("a", "a"), LayerNorm("ln", "ln")]) == []


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: Dense(3, "fc"), "torch must be a str module path such as 'encoder.layer.0', got int 3"),
        (lambda: Dense("fc", None), "flax must be a str module path such as 'encoder/layer_0', got NoneType None"),
        (lambda: Dense("a..b", "fc"), "torch path 'a..b' has an empty part or whitespace"),
        (lambda: Dense(".fc", "fc"), "torch path '.fc' has an empty part"),
        (lambda: Conv("c", "enc//c"), "flax path 'enc//c' has an empty part"),
        (lambda: LayerNorm("ln ", "ln"), "torch path 'ln ' has an empty part or whitespace"),
        (lambda: Embedding("emb", "emb/"), "flax path 'emb/' has an empty part"),
        (lambda: Dense("fc", "fc", bias="yes"), "bias must be True or False, got 'yes'"),
        (lambda: Attention("a", "a", heads=0), r"heads must be an int >= 1, got 0"),
        (lambda: Attention("a", "a", heads=2.0), r"heads must be an int >= 1, got 2.0"),
        (lambda: Attention("a", "a", heads=True), r"heads must be an int >= 1, got True"),
        (lambda: Attention("", "a", query="s..q", heads=2), "query path 's..q' has an empty part"),
        (lambda: PackedAttention("a", "a", heads=-1), r"heads must be an int >= 1, got -1"),
    ],
)
def test_bad_rule_is_a_usage_error(make, fragment: str) -> None:  # noqa: ANN001
    with pytest.raises(UsageError, match="bad layout rule") as info:
        make()
    assert fragment in str(info.value)


def test_bad_rule_lists_every_problem() -> None:
    with pytest.raises(UsageError) as info:
        Attention("a..b", 7, heads=0, bias=None)  # type: ignore[arg-type]
    assert sorted(p.split(" ", 1)[0] for p in info.value.problems) == ["bias", "flax", "heads", "torch"]


def test_root_paths_name_a_single_layer_model() -> None:
    """``""`` is the model's root: a model that is one Linear has keys ``weight`` / ``params/kernel``."""
    assert layouts.canonical_names([Dense("", "")]) == ["bias", "weight"]
    assert layouts.flax_names([Dense("", "")]) == ["params/bias", "params/kernel"]


def test_flatten_unflatten_round_trip_and_frozendict() -> None:
    tree = {"params": {"a": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}, "b": {"scale": np.ones(1)}},
            "batch_stats": {"b": {"mean": np.zeros(1)}}}
    flat = layouts.flatten_flax(tree)
    assert sorted(flat) == ["batch_stats/b/mean", "params/a/bias", "params/a/kernel", "params/b/scale"]
    back = layouts.unflatten_flax(flat)
    assert layouts.flatten_flax(back).keys() == flat.keys()
    from flax import core

    frozen = core.freeze(tree)
    assert sorted(layouts.flatten_flax(frozen)) == sorted(flat)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["hidden.weight", "hidden.bias"], False),
        (["params/hidden/kernel"], True),
        (["batch_stats/bn/mean", "params/bn/scale"], True),
        (["hidden/kernel", "output/bias"], True),  # a bare params tree
        (["module.hidden.weight", "x/y"], False),
        ([], False),
    ],
    ids=["torch", "flax", "flax-stats", "bare-params", "mixed", "empty"],
)
def test_is_flax_layout(keys: list[str], expected: bool) -> None:
    assert layouts.is_flax_layout(keys) is expected
