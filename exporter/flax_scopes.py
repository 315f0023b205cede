"""Which flax module each node of a jax2onnx export came from.

jax2onnx 0.17 records no module names: nodes are named after their op and a counter
(``node_Gemm_13``), initializers ``const_N``, and the linen layers it lowers directly
(``nn.Dense``, ``nn.Conv``, ``nn.LayerNorm``, attention, ...) are bound as primitives
outside the module's name scope, so even the jaxpr's ``name_stack`` loses them.  This
module restores that information while a model is exported:

* every linen layer patched by a jax2onnx plugin runs inside ``jax.named_scope(name)``
  (flax already does this for the modules it calls itself), so each equation's
  ``source_info.name_stack`` is the module path (``MiniLM/encoder/layer_3/attention``);
* every ONNX node created while an equation is lowered gets that path in its
  ``metadata_props`` under :data:`SCOPE_KEY` (nested equations, e.g. inside ``jit``,
  extend their caller's path).

Both are hooks into jax2onnx internals (``plugin_system.apply_patches`` and
``lowering_dispatch.current_eqn_scope``); :func:`recording` checks that they exist and
says so when they do not, so a jax2onnx release that changes them degrades to "no module
scopes" rather than a wrong mapping.  The hooks change no node, name or value: an export
made while recording has the same graph as one made without (``tests/test_explain.py``
checks this).

Imports jax, flax and jax2onnx only when :func:`recording` is entered.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["SCOPE_KEY", "ScopeRecording", "recording", "node_scopes", "resolve_scope"]

#: ``metadata_props`` key holding a node's flax module path, ``/``-separated, starting with
#: the root module's class name (``"CNN/conv1"``).
SCOPE_KEY = "pkg.exporter.flax_scope"

_LOCK = threading.RLock()
_ACTIVE = threading.local()  # nested recording() in one thread: the outer one's patches serve


class ScopeRecording:
    """The state of one :func:`recording`: ``active`` is False (with ``reason``) when the
    installed jax2onnx does not have the hooks this module needs."""

    def __init__(self, active: bool, reason: str = "") -> None:
        self.active = active
        self.reason = reason


def _hooks() -> tuple[Any, Any, Any, Any] | str:
    """jax2onnx's ``lowering_dispatch``, ``plugin_system``, ``MonkeyPatchSpec`` and its
    target resolver, or why they cannot be used."""
    try:
        from jax2onnx.converter import lowering_dispatch
        from jax2onnx.plugins import _patching, plugin_system
    except ImportError as e:
        return f"jax2onnx internals not found ({e})"
    missing = [
        name
        for mod, name in (
            (lowering_dispatch, "current_eqn_scope"),
            (plugin_system, "apply_patches"),
            (_patching, "MonkeyPatchSpec"),
            (_patching, "_resolve"),
        )
        if not hasattr(mod, name)
    ]
    if missing:
        return f"jax2onnx has no {', '.join(missing)}"
    return lowering_dispatch, plugin_system, _patching.MonkeyPatchSpec, _patching._resolve


@contextlib.contextmanager
def recording() -> Iterator[ScopeRecording]:
    """While active, jax2onnx exports tag every node with its flax module path (:data:`SCOPE_KEY`).

    Process-wide (it patches jax2onnx's module globals), so entries from several threads
    are serialised by a lock; a nested entry in the same thread uses the outer one's hooks.

    Yields:
        A :class:`ScopeRecording`; when ``active`` is False nothing is patched.

    Raises:
        MissingDependencyError: jax, flax or jax2onnx is not installed.
    """
    from exporter.deps import require

    jax = require("jax", "recording flax module scopes")
    nn = require("flax.linen", "recording flax module scopes")
    require("jax2onnx", "recording flax module scopes")
    hooks = _hooks()
    if isinstance(hooks, str):
        yield ScopeRecording(False, hooks)
        return
    dispatch, plugins, patch_spec, resolve = hooks
    if getattr(_ACTIVE, "depth", 0):
        _ACTIVE.depth += 1
        try:
            yield ScopeRecording(True)
        finally:
            _ACTIVE.depth -= 1
        return
    with _LOCK:
        original_scope = dispatch.current_eqn_scope
        original_apply = plugins.apply_patches
        stack: list[str] = []

        @contextlib.contextmanager
        def eqn_scope(ctx: Any, eqn: Any) -> Iterator[None]:
            info = getattr(eqn, "source_info", None)
            own = str(getattr(info, "name_stack", "") or "")
            path = "/".join(p for p in (stack[-1] if stack else "", own) if p)
            stack.append(path)
            try:
                with original_scope(ctx, eqn):
                    yield
            finally:
                stack.pop()
                _tag_new_nodes(ctx, path)

        def scoped(fn: Any) -> Any:
            if not callable(fn):
                return fn

            @functools.wraps(fn)  # keeps the plugin's marker attributes on the wrapper
            def call(self: Any, *args: Any, **kwargs: Any) -> Any:
                with jax.named_scope(getattr(self, "name", None) or type(self).__name__):
                    return fn(self, *args, **kwargs)

            return call

        def apply_patches(specs: Any) -> Any:
            out = []
            for s in specs:
                if isinstance(s, patch_spec):
                    try:
                        target = resolve(s.target)
                    except Exception:  # a plugin for a library that is not installed: leave it alone
                        target = None
                    if isinstance(target, type) and issubclass(target, nn.Module):
                        s = patch_spec(
                            target=s.target,
                            attr=s.attr,
                            make_value=lambda orig, make=s.make_value: scoped(make(orig)),
                            delete_if_missing=s.delete_if_missing,
                        )
                out.append(s)
            return original_apply(out)

        dispatch.current_eqn_scope = eqn_scope
        plugins.apply_patches = apply_patches
        _ACTIVE.depth = 1
        try:
            yield ScopeRecording(True)
        finally:
            _ACTIVE.depth = 0
            dispatch.current_eqn_scope = original_scope
            plugins.apply_patches = original_apply


def _tag_new_nodes(ctx: Any, path: str) -> None:
    """Give every node of ``ctx``'s graph that has no scope yet the scope ``path``.

    Runs when an equation's lowering ends, so the nodes it (or its nested equations,
    tagged first with their longer paths) created are exactly the untagged ones.
    """
    builder = getattr(ctx, "builder", None)
    graph = getattr(builder, "graph", None)
    if graph is None:
        return
    for node in graph:
        props = node.metadata_props
        if SCOPE_KEY not in props:
            props[SCOPE_KEY] = path


def node_scopes(model: Any) -> dict[str, str]:
    """``{node name: recorded flax scope}`` of an ``onnx.ModelProto`` (empty when none was recorded)."""
    out: dict[str, str] = {}
    for node in model.graph.node:
        for p in node.metadata_props:
            if p.key == SCOPE_KEY:
                out[node.name] = p.value
    return out


def resolve_scope(scope: str, modules: Mapping[str, Any] | set[str]) -> str:
    """The deepest known module path (``"encoder/layer_3/attention"``) that ``scope`` names.

    ``scope`` starts with the root module's class name, which is dropped.  Components that
    name no module (``jit(gelu)``, a repeated name from a plugin that calls the original
    layer) are skipped.  Returns ``""`` (the root module) when nothing matches.
    """
    known = set(modules)
    prefixes = {"/".join(k.split("/")[:i]) for k in known for i in range(1, len(k.split("/")) + 1)}
    parts = [p for p in scope.split("/") if p][1:]
    current = ""
    for part in parts:
        candidate = f"{current}/{part}" if current else part
        if candidate in prefixes:
            current = candidate
    while current and current not in known:  # a prefix that is no module itself
        current = current.rsplit("/", 1)[0] if "/" in current else ""
    return current
