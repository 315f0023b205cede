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

Command line::

    python -m exporter train mlp --ckpt-dir ckpts --steps 100 --every 10 --keep 3
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter import atomic
from exporter import checkpoint as ckpt
from exporter.deps import require
from exporter.errors import CheckpointError, UsageError
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
    def __init__(self, spec: ModelSpec, canonical: Mapping[str, np.ndarray], cfg: TrainConfig) -> None:
        torch = require("torch", "training with framework='torch'")

        from exporter import rebuild

        self.torch = torch
        self.spec = spec
        self.module = rebuild.torch_module(spec, canonical)
        self.module.train()
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
    if problems:
        raise UsageError.listing("invalid training arguments:", problems)


def _check_resume(c: ckpt.Checkpoint, spec: ModelSpec, framework: str, cfg: TrainConfig, root: Path) -> None:
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
    saved = c.state.get("config", {})
    now = cfg.to_dict()
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError.listing(
            f"cannot resume from {c.path}: the run settings differ (a resumed run must use the same settings "
            "to stay bit-exact; pass the checkpoint's values or use another --ckpt-dir):",
            diffs,
        )
    from exporter import rebuild

    expected = rebuild.expected_state(spec, framework)
    model = c.group("model")
    problems = [f"missing key {k!r}" for k in expected if k not in model]
    problems += [f"unexpected key {k!r}" for k in model if k not in expected]
    for k in expected.keys() & model.keys():
        shape, dtype = expected[k]
        if tuple(model[k].shape) != tuple(shape) or str(model[k].dtype) != dtype:
            problems.append(
                f"mismatched {k}: checkpoint has {model[k].dtype}{list(model[k].shape)}, model expects {dtype}{list(shape)}"
            )
    if problems:
        raise CheckpointError.listing(
            f"checkpoint {c.path} (model {c.model!r}) does not fit the current {spec.name!r} architecture; "
            "use the model definition it was trained with or another --ckpt-dir:",
            problems,
        )


def _move_aside(path: Path) -> Path:
    target = path.with_name(f"{path.name}.corrupt")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt{n}")
    os.replace(path, target)
    atomic.fsync_dir(path.parent)
    return target


def _seed_all(seed: int, framework: str) -> None:
    random.seed(seed)
    np.random.seed(seed)
    if framework == "torch":
        require("torch", "training with framework='torch'").manual_seed(seed)


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
        batch_size: samples per step.
        dataset_size: samples in the synthetic dataset.
        lr: initial learning rate.
        on_step: called as ``on_step(step, loss)`` after every step (e.g. for progress).

    Returns:
        A :class:`TrainResult` (``bool()`` True when ``steps`` was reached).

    Raises:
        UsageError: invalid arguments (every one listed), or the model has no build for
            ``framework``.
        UnknownModelError: ``model`` is not registered.
        CheckpointError: ``ckpt_dir`` is a file, the directory holds another
            model's/framework's run or different settings, another run holds its lock, or a
            checkpoint cannot be written (e.g. no free space; the previous checkpoint stays
            intact).
        CheckpointCorruptError: the directory holds step directories but none is valid.
        MissingDependencyError: the framework is not installed.
    """
    from exporter.models import registry

    if isinstance(model, str):
        spec = registry.get(model)
    elif isinstance(model, registry.ModelSpec):
        spec = model
    else:
        raise UsageError(f"model must be a registry name or a ModelSpec, got {_show(model)}; see `exporter list`")
    _check_args(ckpt_dir, steps, every, keep, keep_every, framework, seed, batch_size, dataset_size, lr, on_step)
    spec.factory(framework)  # UsageError when the model has no such build
    steps, every, keep, seed = int(steps), int(every), int(keep), int(seed)
    keep_every = int(keep_every) if keep_every is not None else None
    cfg = TrainConfig(seed=seed, batch_size=int(batch_size), dataset_size=int(dataset_size), lr=float(lr))
    root = Path(ckpt_dir)
    t0 = time.perf_counter()
    with lock_dir(root):
        cleaned = [str(p) for p in ckpt.clean(root)]
        for p in cleaned:
            log.info("removed leftover %s (an interrupted checkpoint write)", p)
        bad: list[tuple[Path, list[str]]] = []
        latest = ckpt.latest_checkpoint(root, skipped=bad, warn=False)
        if latest is not None:
            _check_resume(latest, spec, framework, cfg, root)
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
            warnings.warn(msg, ckpt.CheckpointWarning, stacklevel=2)
            skipped.append(msg)

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
            log.info("resuming %s (%s) from %s", spec.name, framework, latest.path)

        newest = latest.path if latest is not None else None
        for step in range(start + 1, steps + 1):
            idx = data.next_indices()
            scale = random.choice(NOISE_SCALES)
            batch = {n: v[idx] for n, v in data.inputs.items()}
            targets = {n: v[idx] for n, v in data.targets.items()}
            loss = run.step(batch, targets, scale)
            if on_step is not None:
                on_step(step, loss)
            ckpt.crash_point(f"step:{step}")
            if step % every == 0 or step == steps:
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
                newest = ckpt.save_checkpoint(
                    root,
                    step,
                    model=spec.name,
                    framework=framework,
                    tensors=groups,
                    state=state,
                    keep=keep,
                    keep_every=keep_every,
                )
                log.info("step %d: loss %.6g; wrote %s", step, loss, newest)
        if start >= steps:
            log.info("%s already holds step %d >= %d; nothing to do", root, start, steps)
        final = run.canonical()
        kept = tuple(str(p) for p in ckpt.step_dirs(root))
    return TrainResult(
        model=spec.name,
        framework=framework,
        ckpt_dir=str(root),
        steps=steps,
        start_step=start,
        final_step=max(start, steps),
        resumed_from=str(latest.path) if latest is not None else None,
        checkpoint=str(newest) if newest is not None else None,
        checkpoints=kept,
        loss=None if loss is None else float(loss),
        params_sha256=ckpt.state_sha256(final),
        config=cfg,
        skipped=tuple(skipped),
        cleaned=tuple(cleaned),
        seconds=round(time.perf_counter() - t0, 3),
    )
