"""Run a registry model's framework build with every submodule's output captured.

    torch:  a forward hook on every ``named_modules()`` entry (the root included);
    flax:   ``flax.linen.intercept_methods`` around ``module.apply`` (the hook that
            ``capture_intermediates=True`` uses), every ``__call__`` recorded, under
            ``jax.jit`` like the jax runtime.

Both record module calls in the order they *finish* (a child before its parent), which is
the order :mod:`exporter.explain` walks to find the first module that diverges.  Only
floating-point outputs are kept (integer masks and shapes are compared exactly elsewhere).
Module paths are the frameworks' own: torch ``"encoder.layer.3.attention.self.query"``
(``named_modules`` names), flax ``"encoder/layer_3/attention/query"``; the root is ``""``.

**Which elements reach the outputs.**  With ``relevance=True`` each captured output also
gets a boolean mask of the elements the model's outputs depend on at these inputs: the
elements where the gradient of ``sum(outputs * s)`` (``s`` a fixed random ±1 per output
element) is non-zero.  An error elsewhere cannot change any output: hidden states at
padded sequence positions (masked out of attention and zeroed before pooling), the
non-maximal inputs of a max-pool, a ReLU's negative inputs.  Structural zeros are exact;
an accidental zero of a sum of random-signed terms has probability zero.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.deps import require

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec

__all__ = ["ModuleCall", "Capture", "SEPARATORS", "TorchCapturer", "FlaxCapturer", "capturer"]

#: Module path separator per framework.
SEPARATORS: Mapping[str, str] = {"torch": ".", "flax": "/"}
_SIGN_SEED = 0x5167


@dataclass(frozen=True)
class ModuleCall:
    """One call of one submodule.

    Attributes:
        path: the module's path (``""``: the root module).
        kind: its class name.
        call: 0 for its first call in a forward pass, 1 for the second, ...
        outputs: its floating-point outputs (numpy, the framework's layout), in the order
            the module returned them (nested tuples/dicts flattened).
        relevant: per output, the mask of elements the model's outputs depend on (None:
            not computed, or the output is not connected to the model's parameters).
    """

    path: str
    kind: str
    call: int
    outputs: tuple[np.ndarray, ...]
    relevant: tuple[np.ndarray | None, ...] = ()


@dataclass(frozen=True)
class Capture:
    """Every module call of one forward pass, in the order the calls finished."""

    framework: str
    calls: tuple[ModuleCall, ...]


def _is_float(a: Any) -> bool:
    dt = np.dtype(a.dtype) if not hasattr(a.dtype, "is_floating_point") else None
    if dt is None:
        return bool(a.dtype.is_floating_point)
    return dt.kind in "fc" or dt.name == "bfloat16"


def _numbered(raw: list[tuple[str, str, tuple[np.ndarray, ...], tuple[np.ndarray | None, ...]]]) -> tuple[ModuleCall, ...]:
    seen: dict[str, int] = {}
    calls = []
    for path, kind, outs, rel in raw:
        n = seen.get(path, 0)
        seen[path] = n + 1
        calls.append(ModuleCall(path=path, kind=kind, call=n, outputs=outs, relevant=rel))
    return tuple(calls)


def _ordered(spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(inputs[t.name]) for t in spec.inputs]


def _signs(shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    rng = np.random.default_rng(_SIGN_SEED)
    return [rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=s) for s in shapes]


class TorchCapturer:
    """The torch module with forward hooks; :meth:`run` captures one forward pass.

    Args:
        spec: the registry entry (its input order).
        module: the built ``torch.nn.Module`` (``exporter.rebuild.torch_module``).
    """

    framework = "torch"

    def __init__(self, spec: ModelSpec, module: Any) -> None:
        self.spec = spec
        self.module = module.eval()

    def run(self, inputs: Mapping[str, np.ndarray], *, relevance: bool = False) -> Capture:
        """Run once on ``inputs`` (keyed by input name) and return every module call."""
        torch = require("torch", "capturing torch module outputs")
        from torch.utils import _pytree

        raw: list[tuple[str, str, list[Any]]] = []
        values: list[list[np.ndarray]] = []

        def hook(name: str, mod: Any, _args: Any, output: Any) -> None:
            leaves = [t for t in _pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and _is_float(t)]
            # Copied now: a later in-place op (ReLU(inplace=True)) would change the tensor.
            values.append([t.detach().cpu().numpy().copy() for t in leaves])
            if relevance:
                for t in leaves:
                    if t.requires_grad:
                        t.retain_grad()
            raw.append((name, type(mod).__name__, leaves if relevance else []))

        handles = [m.register_forward_hook(functools.partial(hook, name)) for name, m in self.module.named_modules()]
        try:
            args = [torch.from_numpy(np.array(a, order="C", copy=True)) for a in _ordered(self.spec, inputs)]
            with torch.enable_grad() if relevance else torch.inference_mode():
                result = self.module(*args)
        finally:
            for h in handles:
                h.remove()
        masks: list[list[np.ndarray | None]] = [[None] * len(v) for v in values]
        if relevance:
            outs = [t for t in _pytree.tree_leaves(result) if isinstance(t, torch.Tensor) and _is_float(t) and t.requires_grad]
            wanted = [(i, j, t) for i, (_, _, leaves) in enumerate(raw) for j, t in enumerate(leaves) if t.requires_grad]
            if outs and wanted:
                signs = _signs([tuple(o.shape) for o in outs])
                loss = sum((o * torch.from_numpy(s).to(o.dtype)).sum() for o, s in zip(outs, signs))
                grads = torch.autograd.grad(loss, [t for _, _, t in wanted], allow_unused=True)
                for (i, j, _), g in zip(wanted, grads):
                    # unused by the outputs: nothing of it reaches them
                    masks[i][j] = np.zeros(values[i][j].shape, dtype=bool) if g is None else (g != 0).cpu().numpy()
        return Capture(
            "torch",
            _numbered([(name, kind, tuple(v), tuple(m)) for (name, kind, _), v, m in zip(raw, values, masks)]),
        )


class FlaxCapturer:
    """The flax build's ``apply`` with every ``__call__`` intercepted, jitted once.

    Args:
        spec: the registry entry (its input order and ``flax_apply_kwargs``).
        variables: flax variables (``exporter.rebuild.flax_variables``).
    """

    framework = "flax"

    def __init__(self, spec: ModelSpec, variables: Any) -> None:
        jax = require("jax", "capturing flax module outputs")
        nn = require("flax.linen", "capturing flax module outputs")
        self.spec = spec
        self.variables = variables
        module = spec.factory("flax")()
        kwargs = dict(spec.flax_apply_kwargs)
        self._traced: list[tuple[str, str, int]] = []

        def forward(variables: Any, deltas: list[Any] | None, *args: Any) -> tuple[list[Any], list[list[Any]]]:
            """The model's float outputs and every module call's float outputs; with
            ``deltas``, each captured output has its delta (zeros) added, so that the
            gradient with respect to it is the gradient with respect to that output."""
            calls: list[tuple[str, str, list[Any]]] = []

            def interceptor(next_fun: Any, a: Any, k: Any, context: Any) -> Any:
                out = next_fun(*a, **k)
                if context.method_name != "__call__":
                    return out
                leaves, tree = jax.tree_util.tree_flatten(out)
                captured = []
                for n, leaf in enumerate(leaves):
                    if hasattr(leaf, "dtype") and _is_float(leaf):
                        if deltas is not None:
                            leaf = leaf + deltas[sum(len(c[2]) for c in calls) + len(captured)]
                            leaves[n] = leaf
                        captured.append(leaf)
                m = context.module
                calls.append(("/".join(str(p) for p in m.scope.path), type(m).__name__, captured))
                return jax.tree_util.tree_unflatten(tree, leaves)

            with nn.intercept_methods(interceptor):
                result = module.apply(variables, *args, **kwargs)
            # Recorded at trace time; every trace of this function makes the same calls.
            self._traced = [(p, kind, len(c)) for p, kind, c in calls]
            outs = [o for o in jax.tree_util.tree_leaves(result) if _is_float(o)]
            return outs, [c for _, _, c in calls]

        def with_relevance(variables: Any, deltas: list[Any], signs: list[Any], *args: Any) -> Any:
            (outs, captured), pullback = jax.vjp(lambda d: forward(variables, d, *args), deltas)
            (grads,) = pullback((list(signs), [[jax.numpy.zeros_like(x) for x in c] for c in captured]))
            return [g != 0 for g in grads]

        self._jax = jax
        self._plain = jax.jit(lambda variables, *args: forward(variables, None, *args))
        self._relevance = jax.jit(with_relevance)

    def run(self, inputs: Mapping[str, np.ndarray], *, relevance: bool = False) -> Capture:
        """Run once on ``inputs`` (keyed by input name) and return every module call."""
        jax = self._jax
        args = _ordered(self.spec, inputs)
        outs, captured = jax.block_until_ready(self._plain(self.variables, *args))
        masks: list[list[Any]] = [[None] * len(c) for c in captured]
        if relevance and outs:
            deltas = [np.zeros(x.shape, x.dtype) for c in captured for x in c]
            signs = [s.astype(np.dtype(o.dtype)) for s, o in zip(_signs([tuple(o.shape) for o in outs]), outs)]
            flat = iter(jax.block_until_ready(self._relevance(self.variables, deltas, signs, *args)))
            masks = [[np.asarray(next(flat)) for _ in c] for c in captured]
        raw = [
            (p, kind, tuple(np.array(x, copy=True) for x in c), tuple(m))
            for (p, kind, _n), c, m in zip(self._traced, captured, masks)
        ]
        return Capture("flax", _numbered(raw))


def capturer(spec: ModelSpec, framework: str, built: Any) -> TorchCapturer | FlaxCapturer:
    """The capturer for ``framework`` (``"torch"``: ``built`` is the module; ``"flax"``: the variables)."""
    if framework == "torch":
        return TorchCapturer(spec, built)
    assert framework == "flax", framework
    return FlaxCapturer(spec, built)
