"""Write the golden training checkpoint ``tests/data/checkpoint-v1`` (format_version 1).

``tests/test_checkpoint.py`` loads the stored copy (written by an earlier exporter) and
checks that today's code writes the same bytes from the same content.  Regenerate only
when the on-disk format changes on purpose (and bump ``FORMAT_VERSION`` then)::

    .venv/bin/python tests/data/make_checkpoint_v1.py
"""
from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import numpy as np

STEP = 3
HERE = Path(__file__).resolve().parent / "checkpoint-v1"


def content() -> dict:
    """The tensors and state of the golden checkpoint; the same bits on every run."""
    import jax.numpy as jnp
    import torch

    from exporter.rng import capture_rng
    from exporter.treecodec import encode_tree, flatten_pytree

    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 8
    model = {"hidden.weight": w, "hidden.bias": np.array([0.5, -1.0, 2.0, 0.0], np.float32)}
    optimizer = {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.from_numpy(w * 0.25), "half": torch.ones(2, dtype=torch.bfloat16)},
            1: {},
        },
        "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0, 1], "maximize": False, "foreach": None}],
    }
    opt_tensors: dict[str, np.ndarray] = {}
    opt_doc = encode_tree({"optimizer": optimizer, "scheduler": {"last_epoch": 3, "_last_lr": [0.00099]}}, opt_tensors)
    optax_doc, optax_tensors = flatten_pytree(({"count": jnp.asarray(np.int32(3))}, {"mu": {"w": jnp.asarray(w)}}), "optax")
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    gen = np.random.default_rng(11)
    rng_doc, rng_tensors = capture_rng({"data": gen}, torch=True)
    state = {
        "step": STEP,
        "model": "mlp",
        "framework": "torch",
        "loss": encode_tree(float("nan"), {}),
        "data": {"epoch": 1, "index": 8},
        "rng": rng_doc,
        "optimizer": opt_doc,
        "optax": optax_doc,
        "odd": encode_tree({"t": (1, 2.5), 7: np.float32(1.5), "inf": float("inf"), "__x": None}, {}),
    }
    tensors = {
        "model": model,
        "model_extra": {"hidden.num_batches_tracked": np.array(3, np.int64)},
        "optimizer": {**opt_tensors, **optax_tensors},
        "rng": {**rng_tensors, "data/order": np.arange(16, dtype=np.int64)[::-1].copy()},
    }
    return {"tensors": tensors, "state": state}


def write(root: Path) -> Path:
    """Write the golden step into ``root``; returns the step directory."""
    from exporter.checkpoint import save_checkpoint

    c = content()
    return save_checkpoint(root, STEP, model="mlp", framework="torch", tensors=c["tensors"], state=c["state"])


if __name__ == "__main__":
    shutil.rmtree(HERE, ignore_errors=True)
    print(write(HERE), file=sys.stderr)
