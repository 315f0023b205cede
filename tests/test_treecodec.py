"""exporter.treecodec: nested training state <-> plain JSON + tensors, exactly."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from exporter import treecodec
from exporter.errors import CheckpointCorruptError, CheckpointError


def test_encode_tree_roundtrip_exact() -> None:
    obj = {
        "state": {0: {"step": np.array(3.0, np.float32), "buf": np.arange(4.0)}, 1: {}},
        "groups": [{"lr": 0.1 + 0.2, "betas": (0.9, 0.999), "params": [0, 1], "flag": None, "on": True}],
        "odd": {"__tensor__": "not a ref", "inf": math.inf, "nan": math.nan, "neg": -math.inf},
        "scalar": np.float32(1.5),
        "big": 2**100,
    }
    tensors: dict[str, np.ndarray] = {}
    doc = treecodec.encode_tree(obj, tensors)
    text = json.dumps(doc, allow_nan=False)  # plain JSON
    back = treecodec.decode_tree(json.loads(text), tensors)
    assert back["state"][0]["step"].shape == () and back["state"][0]["step"].dtype == np.float32
    assert list(back["state"]) == [0, 1] and back["state"][1] == {}
    assert back["groups"][0]["betas"] == (0.9, 0.999) and isinstance(back["groups"][0]["betas"], tuple)
    assert back["groups"][0]["lr"] == 0.1 + 0.2
    assert back["odd"]["__tensor__"] == "not a ref" and back["odd"]["inf"] == math.inf
    assert math.isnan(back["odd"]["nan"])
    assert back["scalar"] == np.float32(1.5) and type(back["scalar"]) is np.float32
    assert back["big"] == 2**100
    with pytest.raises(CheckpointError, match="type builtins.object"):
        treecodec.encode_tree({"a": [object()]}, {})


def test_torch_optimizer_and_scheduler_roundtrip_bit_exact() -> None:
    import torch

    def make() -> tuple:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 2))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return m, opt, sched

    def step(m, opt, sched, i: int) -> None:  # noqa: ANN001
        x = torch.from_numpy(np.random.default_rng(i).standard_normal((4, 5)).astype(np.float32))
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
        sched.step()

    m, opt, sched = make()
    for i in range(3):
        step(m, opt, sched, i)
    tensors: dict[str, np.ndarray] = {}
    doc = treecodec.encode_tree({"opt": opt.state_dict(), "sched": sched.state_dict()}, tensors)
    saved_model = {k: v.clone() for k, v in m.state_dict().items()}
    doc = json.loads(json.dumps(doc))
    for i in range(3, 6):
        step(m, opt, sched, i)

    m2, opt2, sched2 = make()
    m2.load_state_dict(saved_model)
    back = treecodec.decode_tree(doc, tensors)
    assert isinstance(back["opt"]["state"][0]["step"], torch.Tensor)
    assert back["opt"]["state"][0]["step"].shape == ()
    opt2.load_state_dict(back["opt"])
    sched2.load_state_dict(back["sched"])
    for i in range(3, 6):
        step(m2, opt2, sched2, i)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_optax_state_roundtrip_and_structure_check() -> None:
    import jax
    import optax

    jnp = jax.numpy
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    tx = optax.adamw(optax.exponential_decay(1e-2, 1, 0.9))
    state = tx.init(params)
    grads = jax.tree.map(lambda p: p * 0.5 + 0.1, params)
    _, state = tx.update(grads, state, params)
    doc, tensors = treecodec.flatten_pytree(state)
    doc = json.loads(json.dumps(doc))
    back = treecodec.restore_pytree(tx.init(params), doc, tensors)
    a_leaves, a_def = jax.tree_util.tree_flatten(state)
    b_leaves, b_def = jax.tree_util.tree_flatten(back)
    assert a_def == b_def
    for a, b in zip(a_leaves, b_leaves):
        assert isinstance(b, jax.Array) and a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(np.asarray(a), np.asarray(b))
    other = tx.init({"dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}})
    with pytest.raises(CheckpointError, match=r"saved float32\[3, 2\], expected float32\[4, 2\]"):
        treecodec.restore_pytree(other, doc, tensors, what="optax state")
    with pytest.raises(CheckpointError, match="structure differs"):
        treecodec.restore_pytree(optax.sgd(0.1).init(params), doc, tensors)


def test_unknown_tensor_kind_is_corrupt() -> None:
    with pytest.raises(CheckpointCorruptError, match="unknown kind 'cupy'"):
        treecodec.decode_tree({"a": {"__tensor__": "a", "kind": "cupy"}}, {"a": np.zeros(1)})
    with pytest.raises(CheckpointCorruptError, match="tensor 'b', which is not stored"):
        treecodec.decode_tree({"__tensor__": "b"}, {})
