"""Rebuild a registered model from canonical state, in torch or flax.

    raw saved state --prepare_state--> canonical state --torch_module--> torch.nn.Module
                                                      --flax_variables--> flax variables

``prepare_state`` is the one place where checkpoint keys are cleaned up: common wrapper
prefixes are stripped, the model's and the user's rename rules applied, non-parameter
buffers dropped, flax layout converted, and names/shapes/dtypes checked against the model.

Building only: running a built model is the runtime adapters' job
(``exporter.runtimes.torch.TorchRuntime.from_module(spec, module).run(inputs)``,
``exporter.runtimes.jax.JaxRuntime.from_variables(spec, variables).run(inputs)``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter import layouts
from exporter.deps import require
from exporter.errors import StateMismatchError, UsageError, format_problems

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec

__all__ = [
    "STRIP_PREFIXES",
    "StateReport",
    "expected_state",
    "init_state",
    "prepare_state",
    "torch_module",
    "canonical_from_torch",
    "flax_variables",
    "canonical_from_flax",
]

# Wrapper prefixes found in real checkpoints: DDP, torch.compile, Lightning/HF wrappers.
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")

Shape = tuple[int, ...]


def _jax(purpose: str) -> Any:
    """jax, after checking that flax (which every flax build needs) is installed too."""
    jax = require("jax", purpose)
    require("flax", purpose)
    return jax


def _jax_example(spec: ModelSpec, seed: int = 0) -> list[Any]:
    """The spec's example inputs as jax arrays, in input order (for ``module.init``)."""
    jnp = require("jax.numpy", f"building model {spec.name!r} in flax")
    return [jnp.asarray(a) for a in spec.example_inputs(seed=seed).values()]


def _has(module: str) -> bool:
    import importlib.util
    import sys

    if module in sys.modules:
        return sys.modules[module] is not None  # None: import blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _ignored(spec: ModelSpec, name: str) -> bool:
    return any(re.search(p, name) for p in spec.ignore_keys)


# ---------------------------------------------------------------------------------------
# Expected state
# ---------------------------------------------------------------------------------------

_EXPECTED_CACHE: dict[tuple[str, int], dict[str, tuple[Shape, str]]] = {}


def expected_state(spec: ModelSpec, framework: str | None = None) -> dict[str, tuple[Shape, str]]:
    """Canonical names the model expects -> ``(shape, dtype)``.

    Built without allocating weights: the torch build on the ``meta`` device, or
    ``jax.eval_shape`` of the flax init.  Both builds of a registry model expect the same
    canonical state (a test checks it), so the build used is only a question of cost:
    ``framework`` when given (a flax-only job then never imports torch), else torch when
    installed, else flax.

    Args:
        spec: the registry entry.
        framework: ``"torch"`` or ``"flax"``: the build to derive it from (None: either).

    Returns:
        ``{name: (shape, dtype_name)}`` for every canonical name (ignored buffers left out).

    Raises:
        MissingDependencyError: the framework of the model's builds is not installed.
        UsageError: the model has no build at all.
    """
    key = (spec.name, id(spec))
    if key in _EXPECTED_CACHE:
        return dict(_EXPECTED_CACHE[key])
    purpose = f"the expected state of model {spec.name!r} (from its torch or flax build)"
    if framework is not None:
        spec.factory(framework)  # the model must have that build
        use_torch = framework == "torch"
    else:
        use_torch = "torch" in spec.frameworks and (_has("torch") or "flax" not in spec.frameworks or not _has("flax"))
    if use_torch:
        torch = require("torch", purpose)
        with torch.device("meta"):
            module = spec.factory("torch")()
        out = {
            k: (tuple(int(d) for d in v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in module.state_dict().items()
            if not _ignored(spec, k)
        }
    elif "flax" in spec.frameworks:
        jax = _jax(purpose)
        module = spec.factory("flax")()
        inputs = _jax_example(spec)
        abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs, **spec.flax_apply_kwargs))
        flat = {k: v for k, v in _flatten_abstract(abstract).items() if k.split("/", 1)[0] in layouts.COLLECTIONS}
        dummies = {k: np.broadcast_to(np.zeros((), dtype=v.dtype), v.shape) for k, v in flat.items()}
        out = {}
        for r in spec.layout:
            if all(f in dummies for f in r.flax_keys()):
                for c, a in r.from_flax({f: dummies[f] for f in r.flax_keys()}).items():
                    out[c] = (tuple(int(d) for d in np.shape(a)), str(np.asarray(a).dtype))
    else:
        raise UsageError(f"model {spec.name!r} has neither a torch nor a flax build; its state cannot be rebuilt")
    _EXPECTED_CACHE[key] = out
    return dict(out)


def _flatten_abstract(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        for k, v in tree.items():
            out.update(_flatten_abstract(v, f"{prefix}/{k}" if prefix else str(k)))
    else:
        out[prefix] = tree
    return out


# ---------------------------------------------------------------------------------------
# Seeded initial state
# ---------------------------------------------------------------------------------------


def init_state(spec: ModelSpec, seed: int = 0, framework: str = "torch") -> dict[str, np.ndarray]:
    """A seeded, deterministic canonical state for ``spec``.

    The chosen framework's own initialisers draw the weights; then every parameter that the
    initialiser leaves constant (norm scales = 1, biases = 0, BatchNorm running mean 0 /
    var 1) gets seeded noise, so that a swapped or dropped scale, bias or running statistic
    shows up as a parity failure instead of hiding behind an identity value.

    Args:
        spec: the registry entry.
        seed: RNG seed; the same (spec, seed, framework) gives bit-identical arrays.
        framework: ``"torch"`` or ``"flax"`` (whose initialisers to use).

    Returns:
        Canonical state (numpy arrays).

    Raises:
        UsageError: unknown framework or the model has no such build.
        MissingDependencyError: the framework is not installed.
    """
    factory = spec.factory(framework)
    purpose = f"initialising model {spec.name!r} in {framework}"
    if framework == "torch":
        torch = require("torch", purpose)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = factory()
        state = canonical_from_torch(module, spec)
    else:
        jax = _jax(purpose)
        module = factory()
        inputs = _jax_example(spec, seed)
        variables = module.init(jax.random.PRNGKey(seed), *inputs, **spec.flax_apply_kwargs)
        state = canonical_from_flax(spec, variables)
    return _perturb_constants(state, seed)


def _perturb_constants(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0x5EED])
    out: dict[str, np.ndarray] = {}
    for name in sorted(state):
        a = state[name]
        if a.dtype.kind == "f" and a.size > 0 and np.all(a == a.flat[0]):
            noise = rng.standard_normal(a.shape)
            if name.endswith("running_var"):
                a = rng.uniform(0.5, 1.5, size=a.shape)  # must stay positive
            elif name.endswith("bias") or name.endswith("running_mean"):
                a = 0.1 * noise
            else:  # scales (1.0) and anything else constant
                a = a + 0.1 * noise
            a = a.astype(state[name].dtype)
        out[name] = a
    return out


# ---------------------------------------------------------------------------------------
# Saved state -> canonical state
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateReport:
    """What ``prepare_state`` found.  ``bool(report)`` is True when the state fits the model.

    Attributes:
        missing: expected names absent from the state (sorted).
        unexpected: names in the state the model does not have (sorted).
        mismatched: one line per shape/dtype mismatch, ``"name: got ..., expected ..."`` (sorted).
        renamed: ``(original key, canonical name)`` for every key whose name changed.
        dropped: keys dropped as non-parameter buffers (``spec.ignore_keys``), sorted.
        source: the file the state came from, if known.
        layout: ``"torch"`` or ``"flax"`` (the layout the state was stored in).
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()
    dropped: tuple[str, ...] = ()
    source: str | None = None
    layout: str = "torch"
    model: str = field(default="")

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __bool__(self) -> bool:
        return self.ok

    def lines(self) -> list[str]:
        """One line per problem, sorted."""
        out = [f"missing key {k!r}" for k in self.missing]
        out += [f"unexpected key {k!r}" for k in self.unexpected]
        out += [f"mismatched {m}" for m in self.mismatched]
        return sorted(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source": self.source,
            "layout": self.layout,
            "ok": self.ok,
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": list(self.mismatched),
            "renamed": [list(p) for p in self.renamed],
            "dropped": list(self.dropped),
        }

    def message(self) -> str:
        where = f" in {self.source}" if self.source else ""
        header = (
            f"state{where} does not fit model {self.model!r}: {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched. "
            "Fix: load the checkpoint written for this model, pass rename rules "
            "(--rename REGEX=REPLACEMENT) for differently named keys, or use non-strict loading"
        )
        return format_problems(header, self.lines())


def _fmt(shape: Shape, dtype: str) -> str:
    return f"shape {tuple(shape)} {dtype}"


def _compile_renames(rules: Sequence[tuple[str, str]], what: str) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for pattern, repl in rules:
        try:
            out.append((re.compile(pattern), repl))
        except re.error as e:
            raise UsageError(f"{what} rename pattern {pattern!r} is not a valid regular expression: {e}") from None
    return out


def _apply(rules: list[tuple[re.Pattern[str], str]], key: str) -> str:
    for pat, repl in rules:
        key = pat.sub(repl, key)
    return key


def prepare_state(
    spec: ModelSpec,
    raw: Mapping[str, Any],
    *,
    strict: bool = True,
    rename: Sequence[tuple[str, str]] = (),
    source: str | None = None,
) -> tuple[dict[str, np.ndarray], StateReport]:
    """Turn a loaded state dict (any layout) into canonical state for ``spec``.

    Steps: strip ``module.``/``_orig_mod.``/``model.`` prefixes from keys that only match
    without them; apply ``spec.key_rules``, then the user's ``rename`` rules (regex,
    replacement; ``re.sub`` on each key, in order); drop ``spec.ignore_keys``; convert flax
    layout (detected from the keys) to canonical; check names, shapes and dtypes against
    ``expected_state(spec)``.

    Args:
        spec: the registry entry.
        raw: flat ``{key: array}`` as loaded from a file (torch names, or flax ``params/...``).
        strict: raise on any problem (default); otherwise return what fits plus the report.
        rename: user ``(regex, replacement)`` rules.
        source: the file the state came from, named in messages.

    Returns:
        ``(canonical_state, report)``; with ``strict=False`` the state holds only the keys
        that fit the model.

    Raises:
        StateMismatchError: ``strict`` and any key is missing, unexpected or mismatched;
            the message lists every problem, sorted, one per line, and names ``source``.
        UsageError: a rename pattern is not a valid regular expression.
    """
    expected = expected_state(spec)
    model_rules = _compile_renames(spec.key_rules, f"model {spec.name!r}")
    user_rules = _compile_renames(rename, "user")
    arrays = {str(k): np.asarray(v) for k, v in raw.items()}
    flax_layout = layouts.is_flax_layout(arrays)
    want_flax = layouts.flax_shapes(expected, spec.layout) if flax_layout else {}
    target = want_flax if flax_layout else expected

    def rewrite(k: str) -> str:
        return _apply(user_rules, _apply(model_rules, k))

    renamed: list[tuple[str, str]] = []
    dropped: list[str] = []
    keyed: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    duplicates: list[str] = []
    for key in sorted(arrays):
        name = rewrite(_strip_prefixes(key, lambda k: _plausible(rewrite(k), target)))
        if flax_layout:
            name = _add_collection(name, target)
        if _ignored(spec, name) or _ignored(spec, key):
            dropped.append(key)
            continue
        if name != key:
            renamed.append((key, name))
        if name in keyed:
            duplicates.append(f"{name!r} (from {origin[name]!r} and {key!r})")
            continue
        keyed[name] = arrays[key]
        origin[name] = key

    missing = sorted(set(target) - set(keyed))
    unexpected = sorted(set(keyed) - set(target))
    mismatched: list[str] = [f"duplicate key {d}" for d in duplicates]
    fits: dict[str, np.ndarray] = {}
    for name in sorted(set(keyed) & set(target)):
        a = keyed[name]
        shape, dtype = target[name]
        if tuple(a.shape) != tuple(shape) or str(a.dtype) != dtype:
            label = name if origin[name] == name else f"{name} (from {origin[name]!r})"
            mismatched.append(f"{label}: got {_fmt(a.shape, str(a.dtype))}, expected {_fmt(shape, dtype)}")
        else:
            fits[name] = a

    if flax_layout:
        canonical: dict[str, np.ndarray] = {}
        for r in spec.layout:
            if all(f in fits for f in r.flax_keys()):
                for c, v in r.from_flax({f: fits[f] for f in r.flax_keys()}).items():
                    canonical[c] = np.asarray(v, order="C")
    else:
        canonical = fits

    report = StateReport(
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(sorted(mismatched)),
        renamed=tuple(renamed),
        dropped=tuple(sorted(dropped)),
        source=source,
        layout="flax" if flax_layout else "torch",
        model=spec.name,
    )
    if strict and not report.ok:
        raise StateMismatchError(report.message(), problems=report.lines())
    return canonical, report


def _strip_prefixes(key: str, matches: Any) -> str:
    """Strip wrapper prefixes (possibly nested: ``module._orig_mod.``) only where ``key`` does
    not match as it is but does once stripped; the fewest strips win."""
    if matches(key):
        return key
    frontier = [key]
    while frontier:
        nxt = [k[len(p) :] for k in frontier for p in STRIP_PREFIXES if k.startswith(p)]
        for k in nxt:
            if matches(k):
                return k
        frontier = nxt
    return key


def _plausible(name: str, target: Mapping[str, Any]) -> bool:
    return name in target or f"params/{name}" in target or f"batch_stats/{name}" in target


def _add_collection(name: str, target: Mapping[str, Any]) -> str:
    """A flax key saved without its collection (just the params tree) gets it back."""
    if name in target or name.split("/", 1)[0] in layouts.COLLECTIONS:
        return name
    for c in layouts.COLLECTIONS:
        if f"{c}/{name}" in target:
            return f"{c}/{name}"
    return name


# ---------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------


def torch_module(spec: ModelSpec, canonical: Mapping[str, np.ndarray], *, copy: bool = False) -> Any:
    """Build the torch module of ``spec`` and load ``canonical`` into it strictly; eval mode.

    Args:
        spec: the registry entry.
        canonical: canonical state (e.g. from ``prepare_state`` or ``init_state``).

    Without ``copy``, the module's parameters and buffers share memory with the arrays of
    ``canonical`` where they can (writeable, aligned, C-contiguous, native byte order), as
    ``torch.from_numpy`` does: the module is then built on the ``meta`` device (no weight
    initialisation, no second copy of the weights) and the arrays are assigned to it.  That
    takes about the weights' bytes in memory instead of three times that, and no time for
    initialisers.  Models where that cannot work (non-parameter buffers that the state does
    not hold, such as BatchNorm's ``num_batches_tracked``; tied weights; a build that fails
    on ``meta``) are built normally and the state copied in.

    Args:
        spec: the registry entry.
        canonical: canonical state (e.g. from ``prepare_state`` or ``init_state``).
        copy: give the module its own copy of every tensor (changes to the module's weights,
            e.g. by training, then never show up in ``canonical``).

    Returns:
        ``torch.nn.Module`` in eval mode with ``requires_grad`` untouched.

    Raises:
        StateMismatchError: a name is missing/unexpected or a shape/dtype differs.
        MissingDependencyError: torch is not installed.
    """
    torch = require("torch", f"rebuilding model {spec.name!r} in torch")
    factory = spec.factory("torch")
    module = None if copy else _meta_build(spec, factory, canonical, torch)
    assign = module is not None
    if module is None:
        with torch.random.fork_rng(devices=[]):  # building must not disturb the caller's RNG
            module = factory()
    own = {k: v for k, v in module.state_dict().items() if not _ignored(spec, k)}
    problems = [f"missing key {k!r}" for k in own if k not in canonical]
    problems += [f"unexpected key {k!r}" for k in canonical if k not in own]
    for k in own.keys() & canonical.keys():
        a, t = np.asarray(canonical[k]), own[k]
        want = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        if tuple(a.shape) != want[0] or str(a.dtype) != want[1]:
            problems.append(f"mismatched {k}: got {_fmt(a.shape, str(a.dtype))}, expected {_fmt(*want)}")
    if problems:
        raise StateMismatchError(
            format_problems(
                f"state does not fit the torch build of model {spec.name!r}; "
                "run it through exporter.rebuild.prepare_state first",
                problems,
            )
        )
    if assign:
        tensors = {k: _from_numpy(_shareable(canonical[k]), torch) for k in own}
    else:  # copied into the module's own tensors by load_state_dict: no extra numpy copy needed
        tensors = {k: _as_torch(canonical[k], torch) for k in own}
    result = module.load_state_dict(tensors, strict=False, assign=assign)
    leftover = [k for k in result.missing_keys if not _ignored(spec, k)] + list(result.unexpected_keys)
    assert not leftover, f"{spec.name}: load_state_dict left {leftover}"
    if assign:
        still_meta = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        assert not still_meta, f"{spec.name}: tensors left on the meta device: {still_meta}"
    module.eval()
    return module


def _meta_build(spec: ModelSpec, factory: Any, canonical: Mapping[str, np.ndarray], torch: Any) -> Any:
    """The module built on the meta device when ``canonical`` can fill every tensor of it; else None."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            module = factory()
    except Exception:  # a build that needs real tensors (e.g. .item() in __init__): build normally
        return None
    seen: dict[int, str] = {}
    for name, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)):
        if id(t) in seen:  # tied weights: assigning would untie them
            return None
        seen[id(t)] = name
        if name not in canonical or _ignored(spec, name):  # e.g. num_batches_tracked, non-persistent buffers
            return None
    return module


def _shareable(a: Any) -> np.ndarray:
    """``a`` itself when torch can use its memory as is, else a copy that it can."""
    arr = np.asarray(a)
    ok = arr.flags.writeable and arr.flags.aligned and arr.flags.c_contiguous and arr.dtype.isnative
    return arr if ok else np.array(arr, copy=True, order="C", dtype=arr.dtype.newbyteorder("="))


def _as_torch(a: Any, torch: Any) -> Any:
    """A tensor viewing ``a`` (read-only arrays too: load_state_dict only reads it)."""
    import warnings

    arr = np.asarray(a)
    if not (arr.flags.aligned and arr.flags.c_contiguous and arr.dtype.isnative):
        arr = np.array(arr, copy=True, order="C", dtype=arr.dtype.newbyteorder("="))
    with warnings.catch_warnings():  # "The given NumPy array is not writable": only read here
        warnings.simplefilter("ignore", UserWarning)
        return _from_numpy(arr, torch)


def _from_numpy(arr: np.ndarray, torch: Any) -> Any:
    """``torch.from_numpy`` (shares memory), also for ml_dtypes bfloat16 arrays."""
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def canonical_from_torch(module: Any, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Canonical state of a torch module: its ``state_dict()`` minus ``spec.ignore_keys``, as numpy copies."""
    return {
        k: v.detach().cpu().numpy().copy()
        for k, v in module.state_dict().items()
        if not _ignored(spec, k)
    }


# ---------------------------------------------------------------------------------------
# flax
# ---------------------------------------------------------------------------------------


def flax_variables(spec: ModelSpec, canonical: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Canonical state -> flax variables ``{"params": ..., "batch_stats": ...}`` of jax arrays.

    Raises:
        StateMismatchError: a name is missing or not owned by the model's layout.
        MissingDependencyError: jax/flax is not installed.
    """
    spec.factory("flax")
    purpose = f"rebuilding model {spec.name!r} in flax"
    jax = _jax(purpose)
    jnp = require("jax.numpy", purpose)
    tree = layouts.to_flax(canonical, spec.layout)
    return jax.tree.map(jnp.asarray, tree)


def canonical_from_flax(spec: ModelSpec, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables (nested, FrozenDict or flat ``params/...`` keys) -> canonical state (numpy)."""
    flat = {k: v for k, v in layouts.flatten_flax(variables).items() if k.split("/", 1)[0] in layouts.COLLECTIONS}
    return layouts.from_flax(flat, spec.layout)
