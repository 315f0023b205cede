"""Deterministic training driver with crash-safe checkpoints and bit-exact auto-resume.

``train("mlp", "ckpts", 100, every=10)`` trains a registry model (torch or flax) on
deterministic synthetic data and writes a full checkpoint (:mod:`exporter.checkpoint`)
every ``every`` steps and at the last step.  Run it again with the same directory and it
resumes from the newest valid checkpoint; the run then ends bit-identical to one that was
never interrupted (same machine, same library versions and thread settings).

What one training step does (both frameworks):

* data: ``dataset_size`` samples drawn once from ``spec.example_inputs`` (seeded) and
  seeded Gaussian regression targets for every float output; each epoch visits them in a
  fresh permutation drawn from a NumPy ``Generator``; a step takes the next ``batch_size``
  indices (the position is ``(epoch, index)`` plus the permutation, all checkpointed);
* augmentation: Gaussian noise on float inputs with a scale chosen by Python ``random``
  (noise from the torch global RNG, or from the JAX PRNG key), so every RNG matters;
* loss: mean squared error summed over the float outputs; AdamW (weight decay 0.01) with
  exponential learning-rate decay (torch ``ExponentialLR`` / optax ``exponential_decay``);
  torch modules run in ``train()`` mode, flax modules with their train flags flipped
  (``train=True`` / ``deterministic=False`` / ``use_running_average=False``) and
  ``batch_stats`` mutable.

The model part is stored in canonical (torch-style) layout for both frameworks, so
``python -m exporter export MODEL --checkpoint CKPT_DIR`` works the same for either.

Distributed runs keep every one of those promises, with the tensors written by the engines:

* torch, ``nproc=P`` (``--nproc P [--strategy ddp|fsdp]``): P processes on
  ``torch.distributed`` (gloo, CPU), the model wrapped in DDP or sharded with FSDP2
  (``fully_shard``).  Every rank walks the same global data order; rank ``r`` trains on
  its contiguous slice of each global batch (``batch_size`` must divide by P), draws its
  augmentation noise from its own torch generator (seeded from ``(seed, rank)``) and keeps
  its own RNG states, which its checkpoint file holds.  exporter starts the ranks itself
  (:func:`exporter.distributed.launch`: 127.0.0.1, a free port), or runs as one rank of a
  job started by ``torchrun`` (rank 0 then holds the lock and decides where to resume).
* flax, ``devices=P`` (``--devices P``): one process over P JAX devices (on a CPU, XLA host
  devices: the job runs in a subprocess started with ``XLA_FLAGS`` set), the batch split
  over the devices and every parameter and optimizer moment sharded FSDP-style
  (:mod:`exporter.flax_mesh`), saved with orbax.

Checkpoints are sharded steps (:mod:`exporter.checkpoint`, layout ``"dcp"`` or ``"orbax"``:
DCP or orbax shards, per-rank RNG files, a manifest written last by rank 0 once every rank has
reported its files, one atomic rename).  A resume with the same P is bit-exact.  A resume
with another P (or strategy) reshards: model, optimizer and scheduler state and the data
position are restored exactly; rank ``r`` continues the RNG streams of saved rank ``r``
(new ranks start from rank 0's Python/NumPy states and a torch generator seeded from
``(seed, rank, step)``), and the summation order of the reductions changes, so the run
then differs in the last bits from one that never changed P.

Command line::

    python -m exporter train mlp --ckpt-dir ckpts --steps 100 --every 10 --keep 3
    python -m exporter train mlp --ckpt-dir ckpts --steps 100 --nproc 2 --strategy fsdp
    torchrun --nproc_per_node 2 -m exporter train mlp --ckpt-dir ckpts --steps 100 --strategy fsdp
    python -m exporter train mlp --ckpt-dir ckpts --steps 100 --framework flax --devices 2
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import numbers
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter import atomic, errors
from exporter import checkpoint as ckpt
from exporter import distributed as dist
from exporter.deps import require
from exporter.errors import CheckpointError, ExporterError, UsageError
from exporter.lock import lock_dir
from exporter.rng import capture_rng, restore_rng
from exporter.treecodec import decode_tree, encode_tree, flatten_pytree, restore_pytree

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec

__all__ = ["TrainConfig", "TrainResult", "train"]

log = logging.getLogger("exporter.training")

NOISE_SCALES = (0.0, 0.01, 0.03)
FRAMEWORKS = ckpt.FRAMEWORKS
# Inference flags of flax apply kwargs and their training values.
_FLAX_TRAIN_FLAGS = {
    "train": True,
    "training": True,
    "is_training": True,
    "deterministic": False,
    "use_running_average": False,
    "eval": False,
    "inference": False,
}


@dataclass(frozen=True)
class TrainConfig:
    """Settings that define the run; a resume must use the same ones (checked)."""

    seed: int = 0
    batch_size: int = 8
    dataset_size: int = 64
    lr: float = 1e-3
    gamma: float = 0.999
    weight_decay: float = 0.01

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """What a ``train`` call did.  ``bool(result)`` is True when the target step was reached."""

    model: str
    framework: str
    ckpt_dir: str
    steps: int
    start_step: int
    final_step: int
    resumed_from: str | None
    checkpoint: str | None
    checkpoints: tuple[str, ...]
    loss: float | None
    params_sha256: str
    config: TrainConfig
    skipped: tuple[str, ...] = ()
    cleaned: tuple[str, ...] = ()
    seconds: float = 0.0
    nproc: int | None = None  # torch ranks (None: one process, format-1 checkpoints)
    strategy: str | None = None  # "ddp" or "fsdp" with nproc
    devices: int | None = None  # flax devices (None: one device, format-1 checkpoints)

    def __bool__(self) -> bool:
        return self.final_step >= self.steps

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        d["checkpoints"] = list(self.checkpoints)
        d["skipped"] = list(self.skipped)
        d["cleaned"] = list(self.cleaned)
        if self.loss is not None and not math.isfinite(self.loss):
            d["loss"] = repr(self.loss)
        d["ok"] = bool(self)
        return d


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
class _Data:
    """Seeded dataset + per-epoch permutation; the position is checkpointed."""

    def __init__(self, spec: ModelSpec, cfg: TrainConfig) -> None:
        self.inputs = spec.example_inputs({"batch": cfg.dataset_size}, seed=cfg.seed)
        self.size = cfg.dataset_size
        self.batch = cfg.batch_size
        self.gen = np.random.default_rng([cfg.seed, 1])
        self.epoch = 0
        self.index = 0
        self.order = self.gen.permutation(self.size)
        self.targets: dict[str, np.ndarray] = {}

    def make_targets(self, spec: ModelSpec, shapes: Mapping[str, tuple[tuple[int, ...], str]], seed: int) -> None:
        rng = np.random.default_rng([seed, 2])
        for name in spec.outputs:
            shape, dtype = shapes[name]
            if np.dtype(dtype).kind == "f":
                self.targets[name] = rng.standard_normal((self.size, *shape[1:])).astype(dtype)
        if not self.targets:
            raise UsageError(f"model {spec.name!r} has no float outputs; the training driver needs one for its loss")

    def next_indices(self) -> np.ndarray:
        if self.index + self.batch > self.size:
            self.epoch += 1
            self.index = 0
            self.order = self.gen.permutation(self.size)
        idx = self.order[self.index : self.index + self.batch]
        self.index += self.batch
        return idx

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"epoch": self.epoch, "index": self.index}, {"data/order": self.order.copy()}

    def restore(self, doc: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
        self.epoch = int(doc["epoch"])
        self.index = int(doc["index"])
        self.order = np.array(tensors["data/order"])


def _named_outputs(spec: ModelSpec, framework: str, result: Any) -> dict[str, Any]:
    """A build's return value keyed by ``spec.outputs`` (a user's spec may not match its build)."""
    outs = list(result) if isinstance(result, (tuple, list)) else [result]
    if len(outs) != len(spec.outputs):
        raise UsageError(
            f"model {spec.name!r}: its {framework} build returns {len(outs)} output(s), but the ModelSpec names "
            f"{len(spec.outputs)} ({', '.join(spec.outputs)}); make outputs= name every returned value, in order"
        )
    return dict(zip(spec.outputs, outs))


# --------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------
class _TorchRun:
    def __init__(
        self, spec: ModelSpec, canonical: Mapping[str, np.ndarray], cfg: TrainConfig, wrap: Callable[[Any], Any] | None = None
    ) -> None:
        torch = require("torch", "training with framework='torch'")

        from exporter import rebuild

        self.torch = torch
        self.spec = spec
        module = rebuild.torch_module(spec, canonical)
        module.train()
        self.module = wrap(module) if wrap is not None else module  # DDP/FSDP2: the optimizer sees their parameters
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=cfg.gamma)

    def output_shapes(self, batch: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
        torch = self.torch
        self.module.eval()  # no running-stat updates, no dropout draws
        with torch.no_grad():
            outs = self._outputs(batch)
        self.module.train()
        return {n: (tuple(o.shape), str(o.dtype).removeprefix("torch.")) for n, o in outs.items()}

    def _outputs(self, batch: Mapping[str, np.ndarray], scale: float | None = None) -> dict[str, Any]:
        torch = self.torch
        args = []
        for t in self.spec.inputs:
            x = torch.from_numpy(np.ascontiguousarray(batch[t.name]))
            if scale is not None and x.is_floating_point():
                x = x + scale * torch.randn(x.shape, dtype=x.dtype)
            args.append(x)
        return _named_outputs(self.spec, "torch", self.module(*args))

    def step(self, batch: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray], scale: float) -> float:
        torch = self.torch
        outs = self._outputs(batch, scale)
        loss = sum(((outs[n] - torch.from_numpy(t)) ** 2).mean() for n, t in targets.items())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        self.opt.step()
        self.sched.step()
        return float(loss.detach())  # type: ignore[union-attr]

    def canonical(self) -> dict[str, np.ndarray]:
        from exporter import rebuild

        return rebuild.canonical_from_torch(self.module, self.spec)

    def snapshot(self) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
        model = self.canonical()
        extra = {k: v.detach().cpu().numpy().copy() for k, v in self.module.state_dict().items() if k not in model}
        opt_tensors: dict[str, np.ndarray] = {}
        doc = encode_tree({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}, opt_tensors)
        groups = {"model": model, "optimizer": opt_tensors}
        if extra:
            groups["model_extra"] = extra
        return groups, doc

    def restore(self, c: ckpt.Checkpoint) -> None:
        torch = self.torch
        for name, arr in c.group("model_extra").items():
            try:
                buf = self.module.get_buffer(name)
            except AttributeError:
                raise CheckpointError(f"checkpoint {c.path}: buffer {name!r} does not exist in model {self.spec.name!r}") from None
            with torch.no_grad():
                buf.copy_(torch.from_numpy(np.array(arr)))
        decoded = decode_tree(c.state["optimizer"], c.group("optimizer"))
        try:
            self.opt.load_state_dict(decoded["optimizer"])
            self.sched.load_state_dict(decoded["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint {c.path}: the optimizer state does not fit model {self.spec.name!r} ({e}); "
                "use the same model and settings, or a new --ckpt-dir"
            ) from e


class _TorchRankRun(_TorchRun):
    """One rank of a DDP/FSDP2 run: the state is saved and loaded with DCP, sharded as it lives."""

    def __init__(self, spec: ModelSpec, canonical: Mapping[str, np.ndarray], cfg: TrainConfig, strategy: str, rank: dist.Rank) -> None:
        super().__init__(spec, canonical, cfg, wrap=lambda m: dist.wrap(m, strategy, rank.world_size))
        self.rank = rank

    def step(self, batch: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray], scale: float) -> float:
        return dist.all_mean(super().step(batch, targets, scale))  # the loss of the global batch

    def dcp_state(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, dict[str, Any]]]]:
        """(tensors for DCP, JSON for state.json, the manifest's model groups)."""
        from exporter import rebuild

        msd, osd = dist.state_dicts(self.module, self.opt)
        doc_tensors: dict[str, np.ndarray] = {}
        doc = {
            "param_groups": encode_tree(osd["param_groups"], doc_tensors),
            "scheduler": encode_tree(self.sched.state_dict(), doc_tensors),
        }
        assert not doc_tensors, sorted(doc_tensors)  # AdamW/ExponentialLR keep their tensors in osd["state"]
        canonical = rebuild.expected_state(self.spec, "torch")
        groups: dict[str, dict[str, dict[str, Any]]] = {"model": {}, "model_extra": {}}
        for k, v in msd.items():
            group = "model" if k in canonical else "model_extra"
            groups[group][k] = {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "key": f"model.{k}"}
        return {"model": msd, "optim": osd["state"]}, doc, {g: e for g, e in groups.items() if e}

    def restore_dcp(self, c: ckpt.Checkpoint) -> None:
        from exporter import rebuild

        msd, osd = dist.state_dicts(self.module, self.opt)  # templates, sharded like this run
        canonical = rebuild.expected_state(self.spec, "torch")
        _check_fit(c, self.spec, {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in msd.items() if k in canonical})
        state = {"model": msd, "optim": osd["state"]}
        dist.load_dcp(state, c.path / "dcp")
        saved = c.state["optimizer"]
        try:
            dist.set_state(
                self.module, self.opt, state["model"], {"state": state["optim"], "param_groups": decode_tree(saved["param_groups"], {})}
            )
            self.sched.load_state_dict(decode_tree(saved["scheduler"], {}))
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint {c.path}: the optimizer state does not fit model {self.spec.name!r} ({e}); "
                "use the same model and settings, or a new --ckpt-dir"
            ) from e

    def digest(self, *, model_only: bool = False) -> str:
        """:func:`exporter.checkpoint.state_sha256` of the full model and optimizer tensors, by DCP key
        (``model_only``: of the canonical model state, as ``TrainResult.params_sha256``).

        Collective (FSDP shards are gathered one tensor at a time); every rank gets it.
        """
        from exporter import rebuild

        msd, osd = dist.state_dicts(self.module, self.opt)
        if model_only:
            canonical = rebuild.expected_state(self.spec, "torch")
            flat = {k: v for k, v in msd.items() if k in canonical}
        else:
            flat = {f"model.{k}": v for k, v in msd.items()}
            flat.update({f"optim.{fqn}.{n}": v for fqn, st in osd["state"].items() for n, v in st.items()})

        def full() -> Any:
            for k in sorted(flat):
                v = flat[k]
                yield {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().numpy()}

        return ckpt.state_sha256_batches(full())


# --------------------------------------------------------------------------------------
# flax
# --------------------------------------------------------------------------------------
class _FlaxProgram:
    """The flax module, optimizer and jitted init/step of one (model, settings) pair.

    Cached per process, so repeated ``train`` calls (tests, notebooks) compile once.
    """

    def __init__(self, spec: ModelSpec, cfg: TrainConfig) -> None:
        purpose = "training with framework='flax'"
        jax = require("jax", purpose)
        self.jnp = require("jax.numpy", purpose)
        self.optax = optax = require("optax", purpose)
        self.jax = jax
        self.spec = spec
        self.module = spec.factory("flax")()
        self.tx = optax.adamw(optax.exponential_decay(cfg.lr, 1, cfg.gamma), weight_decay=cfg.weight_decay)
        self.train_kwargs = {
            k: (_FLAX_TRAIN_FLAGS[k] if k in _FLAX_TRAIN_FLAGS and isinstance(v, bool) else v)
            for k, v in spec.flax_apply_kwargs.items()
        }
        self.float_inputs = [np.dtype(t.dtype).kind == "f" for t in spec.inputs]
        self.init = jax.jit(self.tx.init)  # one compile instead of one per op
        self.step = jax.jit(self._step_fn)

    def _step_fn(self, params: Any, extra: Any, opt_state: Any, key: Any, inputs: list[Any], targets: dict[str, Any], scale: Any) -> Any:
        jax, jnp, optax = self.jax, self.jnp, self.optax
        keys = jax.random.split(key, 2 + len(inputs))
        key, k_drop = keys[0], keys[1]
        noisy = [
            x + scale * jax.random.normal(k, x.shape, x.dtype) if is_f else x
            for x, k, is_f in zip(inputs, keys[2:], self.float_inputs)
        ]
        mutable = sorted(extra)

        def loss_fn(p: Any) -> Any:
            res = self.module.apply(
                {"params": p, **extra}, *noisy, **self.train_kwargs, rngs={"dropout": k_drop}, mutable=mutable or False
            )
            out, new_extra = res if mutable else (res, extra)
            named = _named_outputs(self.spec, "flax", out)
            loss = sum(jnp.mean((named[n] - t) ** 2) for n, t in targets.items())
            return loss, dict(new_extra)

        (loss, new_extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, new_extra, opt_state, key, loss


_FLAX_PROGRAMS: dict[tuple[str, int, TrainConfig], _FlaxProgram] = {}


class _FlaxRun:
    def __init__(self, spec: ModelSpec, canonical: Mapping[str, np.ndarray], cfg: TrainConfig) -> None:
        from exporter import rebuild

        self.spec = spec
        cache_key = (spec.name, id(spec), cfg)
        if cache_key not in _FLAX_PROGRAMS:
            _FLAX_PROGRAMS[cache_key] = _FlaxProgram(spec, cfg)
        self.prog = _FLAX_PROGRAMS[cache_key]
        self.jax, self.jnp = self.prog.jax, self.prog.jnp
        variables = rebuild.flax_variables(spec, canonical)
        self.params = variables["params"]
        self.extra = {k: v for k, v in variables.items() if k != "params"}
        self.opt_state = self.prog.init(self.params)
        self.key = self.jax.random.PRNGKey(cfg.seed)

    def output_shapes(self, batch: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
        jax = self.jax
        args = [batch[t.name] for t in self.spec.inputs]
        variables = {"params": self.params, **self.extra}
        module = self.prog.module
        out = jax.eval_shape(lambda *a: module.apply(variables, *a, **self.spec.flax_apply_kwargs), *args)
        return {n: (tuple(o.shape), str(o.dtype)) for n, o in _named_outputs(self.spec, "flax", out).items()}

    def step(self, batch: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray], scale: float) -> float:
        inputs = [batch[t.name] for t in self.spec.inputs]
        self.params, self.extra, self.opt_state, self.key, loss = self.prog.step(
            self.params, self.extra, self.opt_state, self.key, inputs, dict(targets), np.float32(scale)
        )
        return float(loss)

    def canonical(self) -> dict[str, np.ndarray]:
        from exporter import rebuild

        return rebuild.canonical_from_flax(self.spec, {"params": self.params, **self.extra})

    def snapshot(self) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
        doc, opt_tensors = flatten_pytree(self.opt_state)
        groups = {"model": self.canonical(), "optimizer": opt_tensors, "rng": {"jax/key": np.asarray(self.key)}}
        return groups, {"optax": doc}

    def restore(self, c: ckpt.Checkpoint) -> None:
        jnp = self.jnp
        self.opt_state = restore_pytree(
            self.opt_state,  # the fresh init is the template: same structure, leaves replaced
            c.state["optimizer"]["optax"],
            c.group("optimizer"),
            what="optax state",
        )
        key = c.group("rng").get("jax/key")
        if key is None or key.shape != np.shape(self.key) or key.dtype != np.asarray(self.key).dtype:
            raise CheckpointError(f"checkpoint {c.path}: the JAX PRNG key is missing or has the wrong shape/dtype")
        self.key = jnp.asarray(key)


class _FlaxMeshRun(_FlaxRun):
    """Data parallel over a mesh of JAX devices, parameters and optimizer moments sharded FSDP-style; orbax."""

    def __init__(self, spec: ModelSpec, canonical: Mapping[str, np.ndarray], cfg: TrainConfig, devices: int) -> None:
        from exporter import flax_mesh

        super().__init__(spec, canonical, cfg)
        self.fm = flax_mesh
        self.mesh = flax_mesh.mesh(devices)
        self._compiled: Any = None
        self._place(self.params, self.extra, self.opt_state, self.key)

    def _place(self, params: Any, extra: Any, opt_state: Any, key: Any) -> None:
        fm, m = self.fm, self.mesh
        self.params, self.extra, self.opt_state = fm.place(m, params), fm.place(m, extra), fm.place(m, opt_state)
        self.key = self.jax.device_put(key, fm.sharding_for(m, ()))  # replicated, like the step returns it

    def step(self, batch: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray], scale: float) -> float:
        fm, m = self.fm, self.mesh
        inputs = [fm.batch(m, batch[t.name]) for t in self.spec.inputs]
        tg = {n: fm.batch(m, v) for n, v in targets.items()}
        if self._compiled is None:
            # Fixed in and out shardings: a resumed run (arrays placed from orbax) then runs the
            # very program the uninterrupted one runs.
            keep = (fm.shardings(m, self.params), fm.shardings(m, self.extra), fm.shardings(m, self.opt_state))
            repl = fm.sharding_for(m, ())
            data = [x.sharding for x in inputs], {n: x.sharding for n, x in tg.items()}
            self._compiled = self.jax.jit(self.prog._step_fn, in_shardings=(*keep, repl, *data, repl), out_shardings=(*keep, repl, repl))
        self.params, self.extra, self.opt_state, self.key, loss = self._compiled(
            self.params, self.extra, self.opt_state, self.key, inputs, tg, np.float32(scale)
        )
        return float(loss)

    def orbax_trees(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model variables, optimizer leaves by index): the two orbax items of a step."""
        leaves = self.jax.tree_util.tree_leaves(self.opt_state)
        return {"params": self.params, **self.extra}, {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}

    def restore_orbax(self, c: ckpt.Checkpoint, rank_tensors: Mapping[str, np.ndarray]) -> None:
        from exporter import sharded

        model_t, opt_t = self.orbax_trees()
        live = {n: (tuple(a.shape), str(a.dtype)) for n, a in sharded.flatten(model_t, leaf=lambda a: a).items()}
        _check_fit(c, self.spec, live)
        model = self.fm.restore(c.path / "model", model_t, self.mesh)
        leaves = self.fm.restore(c.path / "optimizer", opt_t, self.mesh)
        treedef = self.jax.tree_util.tree_structure(self.opt_state)
        opt_state = self.jax.tree_util.tree_unflatten(treedef, [leaves[k] for k in sorted(leaves)])
        key = rank_tensors.get("jax/key")
        if key is None or key.shape != np.shape(self.key) or key.dtype != np.asarray(self.key).dtype:
            raise CheckpointError(f"checkpoint {c.path}: the JAX PRNG key is missing or has the wrong shape/dtype")
        self._place(model["params"], {k: v for k, v in model.items() if k != "params"}, opt_state, key)


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:57] + '...' if len(text) > 60 else text} ({type(value).__name__})"


def _check_args(
    ckpt_dir: Any,
    steps: Any,
    every: Any,
    keep: Any,
    keep_every: Any,
    framework: Any,
    seed: Any,
    batch_size: Any,
    dataset_size: Any,
    lr: Any,
    on_step: Any,
    nproc: Any = None,
    strategy: Any = None,
    devices: Any = None,
) -> None:
    """Every argument of the wrong form, listed together in one UsageError."""
    problems = []
    path = os.fspath(ckpt_dir) if isinstance(ckpt_dir, os.PathLike) else ckpt_dir
    if not (isinstance(path, str) and path != ""):
        problems.append(f"ckpt_dir must be a directory path (a non-empty str or os.PathLike), got {_show(ckpt_dir)}")
    if not (_is_int(steps) and steps >= 0):
        problems.append(f"steps must be an integer >= 0 (the total number of steps to reach), got {_show(steps)}")
    if not (_is_int(every) and every >= 1):
        problems.append(f"every must be an integer >= 1 (checkpoint every this many steps), got {_show(every)}")
    if not (_is_int(keep) and keep >= 1):
        problems.append(f"keep must be an integer >= 1 (the newest checkpoint is always kept), got {_show(keep)}")
    if keep_every is not None and not (_is_int(keep_every) and keep_every >= 1):
        problems.append(f"keep_every must be None or an integer >= 1, got {_show(keep_every)}")
    if not (isinstance(framework, str) and framework in FRAMEWORKS):
        problems.append(f"framework must be one of {', '.join(FRAMEWORKS)}, got {_show(framework)}")
    if not (_is_int(seed) and 0 <= seed < 2**32):
        problems.append(f"seed must be an integer in [0, 2**32), got {_show(seed)}")
    if not (_is_int(batch_size) and batch_size >= 1):
        problems.append(f"batch_size must be an integer >= 1, got {_show(batch_size)}")
    elif not (_is_int(dataset_size) and dataset_size >= batch_size):
        problems.append(
            f"dataset_size must be an integer >= batch_size ({batch_size}), got {_show(dataset_size)}; "
            "raise dataset_size or lower batch_size"
        )
    if not (isinstance(lr, numbers.Real) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
        problems.append(f"lr must be a finite number > 0 (the initial learning rate), got {_show(lr)}")
    if on_step is not None and not callable(on_step):
        problems.append(f"on_step must be None or a callable on_step(step, loss), got {_show(on_step)}")
    parts = None
    for name, value in (("nproc", nproc), ("devices", devices)):
        if value is not None and not (_is_int(value) and value >= 1):
            problems.append(f"{name} must be None or an integer >= 1, got {_show(value)}")
        elif value is not None:
            parts = (name, int(value))
    if strategy is not None and strategy not in dist.STRATEGIES:
        problems.append(f"strategy must be None or one of {', '.join(dist.STRATEGIES)}, got {_show(strategy)}")
    if nproc is not None and framework == "flax":
        problems.append("nproc starts torch.distributed ranks; for framework='flax' use devices=P (JAX devices in one process)")
    if devices is not None and framework == "torch":
        problems.append("devices is for framework='flax'; for torch use nproc=P (torch.distributed ranks)")
    if strategy is not None and nproc is None and dist.from_env() is None:
        problems.append("strategy applies to distributed torch runs: pass nproc=P too (or start the job with torchrun)")
    if parts is not None and _is_int(batch_size) and batch_size >= 1 and batch_size % parts[1]:
        problems.append(f"batch_size ({batch_size}) must be a multiple of {parts[0]} ({parts[1]}): each gets an equal slice of every batch")
    if problems:
        raise UsageError.listing("invalid training arguments:", problems)


def _check_fit(c: ckpt.Checkpoint, spec: ModelSpec, expected: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """The checkpoint's model tensors (from its manifest) against what the model expects."""
    model = c.model_info()
    problems = [f"missing key {k!r}" for k in expected if k not in model]
    problems += [f"unexpected key {k!r}" for k in model if k not in expected]
    for k in expected.keys() & model.keys():
        shape, dtype = expected[k]
        if tuple(model[k][0]) != tuple(shape) or model[k][1] != dtype:
            problems.append(
                f"mismatched {k}: checkpoint has {model[k][1]}{list(model[k][0])}, model expects {dtype}{list(shape)}"
            )
    if problems:
        raise CheckpointError.listing(
            f"checkpoint {c.path} (model {c.model!r}) does not fit the current {spec.name!r} architecture; "
            "use the model definition it was trained with or another --ckpt-dir:",
            problems,
        )


def _layout_hint(layout: str) -> str:
    return {
        "files": "a single-process run: resume it without --nproc/--devices",
        "dcp": "a distributed torch run: resume it with --nproc P (any P; another P reshards)",
        "orbax": "a multi-device flax run: resume it with --devices P (any P; another P reshards)",
    }[layout]


def _check_resume(c: ckpt.Checkpoint, spec: ModelSpec, framework: str, cfg: TrainConfig, root: Path, layout: str) -> None:
    if c.model != spec.name:
        raise CheckpointError(
            f"checkpoint directory {root} holds checkpoints of model {c.model!r} (newest valid: {c.path.name}), "
            f"not of model {spec.name!r} that you asked to train; use another --ckpt-dir for {spec.name!r}, "
            f"or train {c.model!r}"
        )
    if c.framework != framework:
        raise CheckpointError(
            f"checkpoint directory {root} holds a {c.framework} training run of {c.model!r} (newest valid: "
            f"{c.path.name}), but --framework {framework} was asked for; resume with --framework {c.framework} "
            "or use another --ckpt-dir"
        )
    if c.layout != layout:
        raise CheckpointError(
            f"checkpoint directory {root} holds {_layout_hint(c.layout).split(':')[0]} (newest valid: {c.path.name}, "
            f"layout {c.layout!r}), not {_layout_hint(layout).split(':')[0]}; {_layout_hint(c.layout).split(': ')[1]}, "
            "or use another --ckpt-dir"
        )
    saved = c.state.get("config", {})
    now = cfg.to_dict()
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError.listing(
            f"cannot resume from {c.path}: the run settings differ (a resumed run must use the same settings "
            "to stay bit-exact; pass the checkpoint's values or use another --ckpt-dir):",
            diffs,
        )
    if layout == "files":  # sharded steps: checked by the ranks against the live model (no framework import here)
        from exporter import rebuild

        _check_fit(c, spec, rebuild.expected_state(spec, framework))


def _move_aside(path: Path) -> Path:
    target = path.with_name(f"{path.name}.corrupt")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt{n}")
    os.replace(path, target)
    atomic.fsync_dir(path.parent)
    return target


def _seed_all(seed: int, framework: str, rank: int | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    if framework == "torch":
        torch = require("torch", "training with framework='torch'")
        # each rank draws its own augmentation noise; rank 0 of a distributed run is not a 1-process run
        torch.manual_seed(seed if rank is None else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


@dataclass
class _Opened:
    """What the start of a run found in the checkpoint directory."""

    latest: ckpt.Checkpoint | None
    cleaned: list[str]
    skipped: list[str]


def _open_dir(root: Path, spec: ModelSpec, framework: str, cfg: TrainConfig, layout: str) -> _Opened:
    """Under the directory's lock: remove temp leftovers, find the newest valid step, move damaged newer ones aside."""
    cleaned = [str(p) for p in ckpt.clean(root)]
    for p in cleaned:
        log.info("removed leftover %s (an interrupted checkpoint write)", p)
    bad: list[tuple[Path, list[str]]] = []
    latest = ckpt.latest_checkpoint(root, skipped=bad, warn=False)
    if latest is not None:
        _check_resume(latest, spec, framework, cfg, root, layout)
    skipped = []
    for p, problems in bad:
        assert latest is not None  # latest_checkpoint raises when nothing is valid
        # Move it out of the way (not delete: it may be worth a look) so that retention
        # and later resumes only see good checkpoints; training rewrites that step.
        aside = _move_aside(p)
        msg = (
            f"skipping corrupt or partial checkpoint {p}: {'; '.join(problems)}; resuming from "
            f"{latest.path.name} instead (moved it aside to {aside.name}; delete it when done)"
        )
        warnings.warn(msg, ckpt.CheckpointWarning, stacklevel=3)
        skipped.append(msg)
    if latest is not None:
        log.info("resuming %s (%s) from %s", spec.name, framework, latest.path)
    return _Opened(latest, cleaned, skipped)


def _loop(
    run: Any,
    data: _Data,
    start: int,
    steps: int,
    every: int,
    save: Callable[[int, float], Path | None],
    *,
    part: slice = slice(None),
    on_step: Callable[[int, float], None] | None = None,
    rank: int | None = None,
) -> tuple[float | None, Path | None]:
    """Steps ``start + 1 .. steps``; ``save(step, loss)`` every ``every`` steps and at the last."""
    loss: float | None = None
    newest = None
    for step in range(start + 1, steps + 1):
        idx = data.next_indices()[part]
        scale = random.choice(NOISE_SCALES)
        batch = {n: v[idx] for n, v in data.inputs.items()}
        targets = {n: v[idx] for n, v in data.targets.items()}
        loss = run.step(batch, targets, scale)
        if on_step is not None:
            on_step(step, loss)
        ckpt.crash_point(f"step:{step}", rank)
        if step % every == 0 or step == steps:
            newest = save(step, loss) or newest
            if newest is not None:
                log.info("step %d: loss %.6g; wrote %s", step, loss, newest)
    return loss, newest


def _registry_spec(model: Any) -> ModelSpec:
    from exporter.models import registry

    if isinstance(model, str):
        return registry.get(model)
    if isinstance(model, registry.ModelSpec):
        return model
    raise UsageError(f"model must be a registry name or a ModelSpec, got {_show(model)}; see `exporter list`")


def train(
    model: str | ModelSpec,
    ckpt_dir: str | os.PathLike[str],
    steps: int,
    *,
    every: int = 10,
    keep: int = 3,
    keep_every: int | None = None,
    framework: str = "torch",
    seed: int = 0,
    batch_size: int = 8,
    dataset_size: int = 64,
    lr: float = 1e-3,
    on_step: Callable[[int, float], None] | None = None,
    nproc: int | None = None,
    strategy: str | None = None,
    devices: int | None = None,
) -> TrainResult:
    """Train ``model`` to ``steps`` steps, checkpointing into ``ckpt_dir``; resume if it holds a run.

    Args:
        model: registry name (or spec) of the model.
        ckpt_dir: checkpoint directory; created if missing, resumed from if it holds checkpoints.
        steps: the total number of training steps to reach (not "more steps").
        every: write a checkpoint every this many steps (and always at the last step).
        keep: keep this many newest checkpoints.
        keep_every: also keep every checkpoint whose step is a multiple of this.
        framework: ``"torch"`` or ``"flax"``.
        seed: seeds data, initial weights and every RNG.
        batch_size: samples per step (the global batch of a distributed run).
        dataset_size: samples in the synthetic dataset.
        lr: initial learning rate.
        on_step: called as ``on_step(step, loss)`` after every step (e.g. for progress);
            not with ``nproc``/``devices`` (the steps run in other processes).
        nproc: torch only: run as this many ``torch.distributed`` ranks (gloo, CPU), started
            here, with DCP checkpoints.  Inside a ``torchrun`` job the ranks are the job's
            (``nproc`` may then be omitted; if given it must equal ``WORLD_SIZE``).
        strategy: with ``nproc``: ``"ddp"`` (default) or ``"fsdp"`` (FSDP2 ``fully_shard``).
        devices: flax only: data parallel over this many JAX devices (CPU host devices, in a
            subprocess), parameters sharded FSDP-style, orbax checkpoints.

    Returns:
        A :class:`TrainResult` (``bool()`` True when ``steps`` was reached).

    Raises:
        UsageError: invalid arguments (every one listed), or the model has no build for
            ``framework``.
        UnknownModelError: ``model`` is not registered.
        CheckpointError: ``ckpt_dir`` is a file, the directory holds another
            model's/framework's run, another layout (single-process vs distributed) or
            different settings, another run holds its lock, a checkpoint cannot be written
            (e.g. no free space; the previous checkpoint stays intact), or a rank of a
            distributed run failed.
        CheckpointCorruptError: the directory holds step directories but none is valid.
        MissingDependencyError: the framework is not installed.
    """
    spec = _registry_spec(model)
    _check_args(ckpt_dir, steps, every, keep, keep_every, framework, seed, batch_size, dataset_size, lr, on_step, nproc, strategy, devices)
    spec.factory(framework)  # UsageError when the model has no such build
    cfg = TrainConfig(seed=int(seed), batch_size=int(batch_size), dataset_size=int(dataset_size), lr=float(lr))
    job: dict[str, Any] = {
        "model": spec.name,
        "steps": int(steps),
        "every": int(every),
        "keep": int(keep),
        "keep_every": int(keep_every) if keep_every is not None else None,
        "framework": framework,
        "config": cfg.to_dict(),
        "ckpt_dir": os.fspath(ckpt_dir),
    }
    world = dist.from_env() if framework == "torch" else None
    if (world is not None or nproc is not None or devices is not None) and on_step is not None:
        raise UsageError("on_step cannot be used with nproc/devices or under torchrun: the steps run in other processes")
    if world is not None:  # one rank of a torchrun job
        problems = []
        if nproc is not None and int(nproc) != world.world_size:
            problems.append(f"nproc={nproc} but this job has WORLD_SIZE={world.world_size} ranks; drop --nproc under torchrun")
        if cfg.batch_size % world.world_size:
            problems.append(f"batch_size ({cfg.batch_size}) must be a multiple of WORLD_SIZE ({world.world_size})")
        if problems:
            raise UsageError.listing("invalid training arguments:", problems)
        return _torch_rank({**job, "nproc": world.world_size, "strategy": strategy or "ddp"}, world, spec, cfg)
    if nproc is not None or devices is not None:
        return _launch(spec, cfg, {**job, "nproc": nproc, "strategy": strategy or ("ddp" if nproc else None), "devices": devices})
    return _single(spec, cfg, job, on_step)


def _result(
    spec: ModelSpec, framework: str, root: Path, steps: int, start: int, resumed_from: str | None, newest: Path | None,
    loss: float | None, digest: str, cfg: TrainConfig, *, main: bool = True, **extra: Any,
) -> TrainResult:  # fmt: skip
    """The :class:`TrainResult` of a run that reached ``max(start, steps)``."""
    kept = ckpt.step_dirs(root)
    if start >= steps and main:
        log.info("%s already holds step %d >= %d; nothing to do", root, start, steps)
    newest = newest if newest is not None else (kept[-1] if kept else None)  # nothing written: the step resumed from
    return TrainResult(
        model=spec.name,
        framework=framework,
        ckpt_dir=str(root),
        steps=steps,
        start_step=start,
        final_step=max(start, steps),
        resumed_from=resumed_from,
        checkpoint=str(newest) if newest is not None else None,
        checkpoints=tuple(str(p) for p in kept),
        loss=None if loss is None else float(loss),
        params_sha256=digest,
        config=cfg,
        **extra,
    )


def _single(spec: ModelSpec, cfg: TrainConfig, job: Mapping[str, Any], on_step: Callable[[int, float], None] | None) -> TrainResult:
    """One process, format-1 checkpoints."""
    framework, steps, seed = job["framework"], job["steps"], cfg.seed
    root = Path(job["ckpt_dir"])
    t0 = time.perf_counter()
    with lock_dir(root):
        opened = _open_dir(root, spec, framework, cfg, "files")
        latest = opened.latest
        data = _Data(spec, cfg)
        if latest is None:
            from exporter import rebuild

            canonical = rebuild.init_state(spec, seed=seed, framework=framework)
        else:
            canonical = latest.group("model")
        run: _TorchRun | _FlaxRun = (_TorchRun if framework == "torch" else _FlaxRun)(spec, canonical, cfg)
        first = {n: v[:1] for n, v in data.inputs.items()}
        data.make_targets(spec, run.output_shapes(first), seed)
        start = 0
        loss: float | None = None
        if latest is None:
            # Seed only now: importing and building the frameworks may draw from the global
            # RNGs, and a resumed run (which restores them here) imports in its own order.
            _seed_all(seed, framework)
        else:
            run.restore(latest)
            st = latest.state
            data.restore(st["data"], latest.group("rng"))
            restore_rng(st["rng"], latest.group("rng"), {"data": data.gen})
            start = latest.step
            loss = decode_tree(st.get("loss"), {})

        def save(step: int, loss: float) -> Path:
            groups, opt_doc = run.snapshot()
            rng_doc, rng_tensors = capture_rng({"data": data.gen}, torch=framework == "torch")
            data_doc, data_tensors = data.state()
            state = {
                "step": step,
                "model": spec.name,
                "framework": framework,
                "config": cfg.to_dict(),
                "loss": encode_tree(loss, {}),
                "data": data_doc,
                "rng": rng_doc,
                "optimizer": opt_doc,
            }
            groups["rng"] = {**groups.get("rng", {}), **rng_tensors, **data_tensors}
            return ckpt.save_checkpoint(
                root, step, model=spec.name, framework=framework, tensors=groups, state=state, keep=job["keep"], keep_every=job["keep_every"]
            )

        last_loss, newest = _loop(run, data, start, steps, job["every"], save, on_step=on_step)
        loss = last_loss if last_loss is not None else loss
        resumed = str(latest.path) if latest is not None else None
        result = _result(spec, framework, root, steps, start, resumed, newest, loss, ckpt.state_sha256(run.canonical()), cfg)
    return dataclasses.replace(
        result, skipped=tuple(opened.skipped), cleaned=tuple(opened.cleaned), seconds=round(time.perf_counter() - t0, 3)
    )


# --------------------------------------------------------------------------------------
# distributed runs: the launcher side
# --------------------------------------------------------------------------------------
_JOB_ENV = "EXPORTER_TRAIN_JOB"


def _launch(spec: ModelSpec, cfg: TrainConfig, job: dict[str, Any]) -> TrainResult:
    """Hold the lock, decide where to resume, start the ranks (or the device process), collect the result."""
    from exporter import flax_mesh
    from exporter.models import registry

    framework = job["framework"]
    layout = "dcp" if framework == "torch" else "orbax"
    if spec.name not in registry.names() or registry.get(spec.name) is not spec:
        raise UsageError(
            f"model {spec.name!r} must be registered (exporter.models.registry.register) to train with nproc/devices: "
            "the ranks look it up by name"
        )
    root = Path(job["ckpt_dir"])
    t0 = time.perf_counter()
    with lock_dir(root):
        opened = _open_dir(root, spec, framework, cfg, layout)
        # The ranks' result files go to a .tmp- directory: a killed launcher's is removed by the next start.
        with atomic.scratch_dir(root) as scratch:
            job = {
                **job,
                "resume": str(opened.latest.path) if opened.latest is not None else None,
                "result": str(scratch / "result"),
                "plugin": spec.factory(framework).__module__,
                "log_level": logging.getLogger("exporter").getEffectiveLevel(),
            }
            cmd = [sys.executable, "-c", "from exporter.training import _rank_main; _rank_main()"]
            env = {_JOB_ENV: json.dumps(job)}
            if framework == "flax":
                env["XLA_FLAGS"] = flax_mesh.xla_flags(job["devices"], os.environ.get("XLA_FLAGS"))
                env["JAX_PLATFORMS"] = os.environ.get("JAX_PLATFORMS", "cpu")
                env[flax_mesh.DEVICES_ENV] = str(job["devices"])
            nproc = job["nproc"] if framework == "torch" else 1
            try:
                dist.launch(cmd, nproc, env=env, what="training" if framework == "torch" else "flax training")
            except CheckpointError:
                _raise_rank_error(Path(job["result"]), nproc)
                raise
            done = json.loads(Path(job["result"] + ".json").read_text())
    done["checkpoints"] = tuple(done["checkpoints"])
    return TrainResult(
        **done,
        config=cfg,
        skipped=tuple(opened.skipped),
        cleaned=tuple(opened.cleaned),
        seconds=round(time.perf_counter() - t0, 3),
        nproc=job["nproc"],
        strategy=job["strategy"],
        devices=job["devices"],
    )


def _raise_rank_error(result: Path, nproc: int) -> None:
    """Re-raise, in the launcher, the ExporterError a rank reported before it stopped."""
    for r in range(nproc):
        f = result.with_name(f"{result.name}.error{r}.json")
        if f.is_file():
            e = json.loads(f.read_text())
            cls = getattr(errors, e["type"], None)
            if not (isinstance(cls, type) and issubclass(cls, ExporterError)):
                cls = CheckpointError
            raise cls(f"rank {r}: {e['message']}" if nproc > 1 else e["message"], problems=e["problems"])


def _rank_main() -> None:
    """Entry point of a rank (or device process) started by :func:`_launch`."""
    job = json.loads(os.environ[_JOB_ENV])
    dist.die_with_parent()
    from exporter.models import registry

    if job["model"] not in registry.names():
        registry.load_plugins([job["plugin"]])
    world = dist.from_env()
    assert world is not None and world.launched
    handler = logging.StreamHandler(sys.stderr)
    who = f"rank {world.rank}" if job["framework"] == "torch" else f"{job['devices']} devices"
    handler.setFormatter(logging.Formatter(f"[{who}] %(message)s"))
    logger = logging.getLogger("exporter")
    logger.addHandler(handler)
    logger.setLevel(job["log_level"])
    logger.propagate = False  # libraries (absl) may have configured the root logger
    spec = registry.get(job["model"])
    cfg = TrainConfig(**job["config"])
    try:
        if job["framework"] == "torch":
            done = _torch_rank(job, world, spec, cfg)
        else:
            done = _flax_devices(job, spec, cfg)
    except ExporterError as e:
        doc = {"type": type(e).__name__, "message": str(e), "problems": list(e.problems)}
        atomic.write_text(job["result"] + f".error{world.rank}.json", json.dumps(doc))
        sys.stderr.write(f"[{who}] {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        os._exit(2)
    if world.rank == 0:
        keep = ("model", "framework", "ckpt_dir", "steps", "start_step", "final_step", "resumed_from", "checkpoint", "checkpoints", "loss", "params_sha256")
        atomic.write_text(job["result"] + ".json", json.dumps({k: getattr(done, k) for k in keep}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: gloo/XLA threads may still be winding down


# --------------------------------------------------------------------------------------
# distributed runs: one torch rank
# --------------------------------------------------------------------------------------
def _torch_rank(job: Mapping[str, Any], world: dist.Rank, spec: ModelSpec, cfg: TrainConfig) -> TrainResult:
    """Train as rank ``world.rank``: under exporter's launcher (which holds the lock) or torchrun."""
    torch = require("torch", "distributed training (--nproc)")
    torch.set_num_threads(1)  # bit-exact: the same kernels in every run, and no oversubscription
    strategy, nproc = job["strategy"], world.world_size
    root = Path(job["ckpt_dir"])
    t0 = time.perf_counter()
    dist.init(world)
    try:
        with contextlib.ExitStack() as stack:
            opened = _Opened(None, [], [])
            if world.launched:
                resume = job["resume"]
            else:  # torchrun: rank 0 holds the lock for the job and decides for everyone
                if world.is_main:
                    stack.enter_context(lock_dir(root))
                    opened = _open_dir(root, spec, "torch", cfg, "dcp")
                resume = dist.broadcast_json(str(opened.latest.path) if opened.latest is not None else None)
            result = _torch_rank_run(job, world, spec, cfg, strategy, resume)
            if world.launched:
                return result
            return dataclasses.replace(
                result,
                skipped=tuple(opened.skipped),
                cleaned=tuple(opened.cleaned),
                seconds=round(time.perf_counter() - t0, 3),
                nproc=nproc,
                strategy=strategy,
            )
    finally:
        dist.shutdown()


def _torch_rank_run(
    job: Mapping[str, Any], world: dist.Rank, spec: ModelSpec, cfg: TrainConfig, strategy: str, resume: str | None
) -> TrainResult:
    from exporter import rebuild, sharded

    root, steps, nproc, rank = Path(job["ckpt_dir"]), job["steps"], world.world_size, world.rank
    latest = None
    if resume is not None:
        saved_world = int(ckpt.load_sharded_state(resume, ()).manifest.get("world_size", 1))
        source = rank if rank < saved_world else 0
        latest = ckpt.load_sharded_state(resume, (source,))
    data = _Data(spec, cfg)
    canonical = rebuild.init_state(spec, seed=cfg.seed, framework="torch")  # overwritten on resume
    run = _TorchRankRun(spec, canonical, cfg, strategy, world)
    data.make_targets(spec, run.output_shapes({n: v[:1] for n, v in data.inputs.items()}), cfg.seed)
    start, loss = 0, None
    if latest is None:
        _seed_all(cfg.seed, "torch", rank)
    else:
        run.restore_dcp(latest)
        doc, tensors = latest.ranks[source]
        data.restore(doc["data"], tensors)
        restore_rng(doc["rng"], tensors, {"data": data.gen})
        start, loss = latest.step, decode_tree(latest.state.get("loss"), {})
        saved_world, saved_strategy = int(latest.manifest["world_size"]), latest.manifest.get("strategy")
        if (saved_world, saved_strategy) != (nproc, strategy):
            if source != rank:  # a rank the checkpoint has no RNG state for
                require("torch", "distributed training (--nproc)").manual_seed(int(np.random.SeedSequence([cfg.seed, rank, start]).generate_state(1)[0]))
            _verify_reshard(latest, run.digest(), world.is_main, f"{saved_world} rank(s) ({saved_strategy})", f"{nproc} ({strategy})")
    local = cfg.batch_size // nproc

    def save(step: int, loss: float) -> Path | None:
        tmp = ckpt.sharded_tmp(root, step)
        (tmp / "dcp").mkdir(parents=True, exist_ok=True)
        tensors, opt_doc, groups = run.dcp_state()
        rng_doc, rng_tensors = capture_rng({"data": data.gen}, torch=True)
        data_doc, data_tensors = data.state()
        files = ckpt.write_rank_files(
            tmp, rank, {"rank": rank, "world_size": nproc, "data": data_doc, "rng": rng_doc}, {**rng_tensors, **data_tensors}
        )
        ckpt.crash_point(f"engine:{step}", rank)
        dist.save_dcp(tensors, tmp / "dcp")
        files.update(ckpt.hash_files(tmp, [f"dcp/{n}" for n in dist.rank_shards(tmp / "dcp", rank)]))
        ckpt.crash_point(f"written:{step}", rank)
        reports = dist.gather_json(files)  # the barrier: returns once every rank has written and fsynced
        if not world.is_main:
            return None
        state = {
            "step": step,
            "model": spec.name,
            "framework": "torch",
            "config": cfg.to_dict(),
            "loss": encode_tree(loss, {}),
            "world_size": nproc,
            "strategy": strategy,
            "optimizer": opt_doc,
        }
        return ckpt.commit_sharded(
            root, step, layout="dcp", model=spec.name, framework="torch", files={k: v for r in reports for k, v in r.items()},
            tensors=groups, state=state, info={"world_size": nproc, "strategy": strategy}, keep=job["keep"], keep_every=job["keep_every"],
        )  # fmt: skip

    last, newest = _loop(run, data, start, steps, job["every"], save, part=slice(rank * local, (rank + 1) * local), rank=rank)
    loss = last if last is not None else loss
    dist.barrier()  # rank 0 has committed the last step
    kept = ckpt.step_dirs(root)
    if not kept:  # steps=0 on an empty directory: the initial state
        digest = run.digest(model_only=True)
    else:  # from the final step, streamed through DCP on rank 0 (no gather of the model)
        digest = ""
        if world.is_main:
            entries = ckpt.load_sharded_state(kept[-1], ()).manifest["tensors"]["model"]
            digest = ckpt.state_sha256_batches(sharded.iter_dcp(kept[-1] / "dcp", {n: e["key"] for n, e in entries.items()}))
        digest = dist.broadcast_json(digest)
    return _result(spec, "torch", root, steps, start, resume, newest, loss, digest, cfg, main=world.is_main, nproc=nproc, strategy=strategy)


def _verify_reshard(c: ckpt.Checkpoint, restored: str, main: bool, was: str, now: str) -> None:
    """After loading a step at another world size: the restored tensors must hash like the saved ones."""
    from exporter import sharded

    saved = ""
    if main:
        if c.layout == "dcp":
            d = c.path / "dcp"
            saved = ckpt.state_sha256_batches(sharded.iter_dcp(d, {k: k for k in sharded.dcp_tensors(d)}))
        else:
            saved = ckpt.state_sha256(_orbax_flat(c.path))
    if c.layout == "dcp":
        saved = dist.broadcast_json(saved)
    if restored != saved:
        raise CheckpointError(
            f"resharding {c.path} from {was} to {now} changed tensors (restored sha256 {restored[:12]}..., saved "
            f"{saved[:12]}...); resume with the world size it was saved with"
        )
    if main:
        log.info(
            "resharded %s from %s to %s: model and optimizer tensors verified identical (sha256 %s); data position restored",
            c.path.name, was, now, saved[:16],
        )


def _orbax_flat(step: Path) -> dict[str, np.ndarray]:
    """Every array of an orbax step (model variables and optimizer leaves) as host arrays, by item path."""
    from exporter import sharded

    return {f"{item}/{k}": v for item in ("model", "optimizer") for k, v in sharded.flatten(sharded.read_orbax(step / item)).items()}


# --------------------------------------------------------------------------------------
# distributed runs: flax over JAX devices (in the process _launch started)
# --------------------------------------------------------------------------------------
def _flax_devices(job: Mapping[str, Any], spec: ModelSpec, cfg: TrainConfig) -> TrainResult:
    from exporter import flax_mesh, rebuild, sharded

    devices = int(job["devices"])
    assert os.environ.get(flax_mesh.DEVICES_ENV) == str(devices)
    root, steps, resume = Path(job["ckpt_dir"]), job["steps"], job["resume"]
    latest = ckpt.load_sharded_state(resume, (0,)) if resume is not None else None
    data = _Data(spec, cfg)
    run = _FlaxMeshRun(spec, rebuild.init_state(spec, seed=cfg.seed, framework="flax"), cfg, devices)
    data.make_targets(spec, run.output_shapes({n: v[:1] for n, v in data.inputs.items()}), cfg.seed)
    start, loss = 0, None
    if latest is None:
        _seed_all(cfg.seed, "flax")
    else:
        doc, tensors = latest.ranks[0]
        run.restore_orbax(latest, tensors)
        data.restore(doc["data"], tensors)
        restore_rng(doc["rng"], tensors, {"data": data.gen})
        start, loss = latest.step, decode_tree(latest.state.get("loss"), {})
        if int(latest.manifest["devices"]) != devices:
            model_t, opt_t = run.orbax_trees()
            restored = {f"{item}/{k}": np.asarray(v) for item, tree in (("model", model_t), ("optimizer", opt_t)) for k, v in sharded.flatten(tree, leaf=lambda a: a).items()}
            _verify_reshard(latest, ckpt.state_sha256(restored), True, f"{latest.manifest['devices']} devices", f"{devices}")

    def save(step: int, loss: float) -> Path:
        tmp = ckpt.sharded_tmp(root, step)
        tmp.mkdir(parents=True)
        ckpt.crash_point(f"engine:{step}", 0)
        model_tree, opt_tree = run.orbax_trees()
        flax_mesh.save(model_tree, tmp / "model")
        flax_mesh.save(opt_tree, tmp / "optimizer")
        rng_doc, rng_tensors = capture_rng({"data": data.gen}, torch=False)
        data_doc, data_tensors = data.state()
        ckpt.write_rank_files(
            tmp, 0, {"rank": 0, "devices": devices, "data": data_doc, "rng": rng_doc},
            {**rng_tensors, **data_tensors, "jax/key": np.asarray(run.key)},
        )  # fmt: skip
        files = ckpt.hash_files(tmp, [f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file()])
        ckpt.crash_point(f"written:{step}", 0)
        model_entries = {
            n: {"dtype": str(a.dtype), "shape": list(a.shape), "key": n} for n, a in sharded.flatten(model_tree, leaf=lambda a: a).items()
        }
        state = {"step": step, "model": spec.name, "framework": "flax", "config": cfg.to_dict(), "loss": encode_tree(loss, {}), "devices": devices}
        return ckpt.commit_sharded(
            root, step, layout="orbax", model=spec.name, framework="flax", files=files, tensors={"model": model_entries},
            state=state, info={"devices": devices}, keep=job["keep"], keep_every=job["keep_every"],
        )  # fmt: skip

    last, newest = _loop(run, data, start, steps, job["every"], save, rank=0)
    loss = last if last is not None else loss
    return _result(spec, "flax", root, steps, start, resume, newest, loss, ckpt.state_sha256(run.canonical()), cfg, devices=devices)
