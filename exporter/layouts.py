"""Canonical parameter names and torch <-> flax layout conversion.

Canonical state is ``dict[str, np.ndarray]`` keyed by torch-style dotted names (what
``torch.nn.Module.state_dict()`` gives, minus non-parameter buffers).  Flax variables are
flattened as ``"<collection>/<path>/<leaf>"``, e.g. ``"params/hidden/kernel"`` or
``"batch_stats/bn/mean"``.

Each registry entry lists ``Rule`` objects; each rule knows the canonical names it owns
and how to move them to and from flax layout.  A rule checks its own fields when it is
made (module paths, ``heads``, ``bias``) and :func:`rule_problems` checks a whole layout
(no name owned twice); both raise ``UsageError`` for a bad user-written rule.  Conversions are pure transposes/reshapes,
so canonical -> flax -> canonical is bit-exact.

    rule            torch (canonical)                         flax
    Dense           weight (out, in), bias                    kernel (in, out), bias
    Conv            weight OIHW, bias                         kernel HWIO, bias
    BatchNorm       weight, bias, running_mean, running_var   params scale/bias, batch_stats mean/var
    LayerNorm       weight, bias                              scale, bias
    Embedding       weight (num, dim)                         embedding (num, dim)
    Attention       {query,key,value,out}.weight/.bias        {query,key,value}.kernel (E, H, D),
                                                              bias (H, D); out.kernel (H, D, E), bias (E,)
    PackedAttention in_proj_weight (3E, E), in_proj_bias,     as Attention
                    out_proj.weight / out_proj.bias
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from exporter.errors import StateMismatchError, UsageError, format_problems

__all__ = [
    "Rule",
    "rule_problems",
    "Dense",
    "Conv",
    "BatchNorm",
    "LayerNorm",
    "Embedding",
    "Attention",
    "PackedAttention",
    "COLLECTIONS",
    "canonical_names",
    "flax_names",
    "to_flax",
    "from_flax",
    "to_flax_flat",
    "from_flax_flat",
    "flax_shapes",
    "flatten_flax",
    "unflatten_flax",
    "is_flax_layout",
]

# Flax variable collections we read and write, in the order they appear in variables.
COLLECTIONS = ("params", "batch_stats")

Array = Any  # np.ndarray (or any array supporting .T / .transpose / .reshape / .shape)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fjoin(collection: str, path: str, leaf: str) -> str:
    return "/".join(p for p in (collection, path, leaf) if p)


@dataclass(frozen=True)
class Rule:
    """Base: ``torch`` is the canonical (dotted) prefix, ``flax`` the '/'-joined module path.

    Subclasses implement ``pairs`` (canonical name <-> flax flat key, one-to-one rules) or
    override ``to_flax``/``from_flax`` (rules that split or merge tensors).
    """

    torch: str
    flax: str

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise UsageError.listing(f"bad layout rule {self!r}", problems)

    def problems(self) -> list[str]:
        """What is wrong with this rule's own fields (empty: nothing).  Subclasses add theirs."""
        return _path_problems("torch", self.torch, ".") + _path_problems("flax", self.flax, "/")

    # -- one-to-one mapping: (canonical name, flax flat key, kind) ---------------------
    def pairs(self) -> list[tuple[str, str, str]]:
        raise NotImplementedError(type(self).__name__)

    def canonical(self) -> list[str]:
        """Canonical names this rule owns."""
        return [c for c, _f, _k in self.pairs()]

    def flax_keys(self) -> list[str]:
        """Flat flax keys (``"params/<path>/<leaf>"``) this rule owns."""
        return [f for _c, f, _k in self.pairs()]

    def to_flax(self, canonical: Mapping[str, Array]) -> dict[str, Array]:
        """Canonical arrays (all of ``self.canonical()``) -> flat flax arrays (views, not copies)."""
        return {f: _TO_FLAX[k](canonical[c]) for c, f, k in self.pairs()}

    def from_flax(self, flat: Mapping[str, Array]) -> dict[str, Array]:
        """Flat flax arrays (all of ``self.flax_keys()``) -> canonical arrays (views)."""
        return {c: _FROM_FLAX[k](flat[f]) for c, f, k in self.pairs()}


def _path_problems(field: str, value: object, sep: str) -> list[str]:
    """Problems of a torch (``sep="."``) or flax (``sep="/"``) module path.

    ``""`` is the model's root (a model that is one ``Linear``: keys ``weight``,
    ``params/kernel``); otherwise every ``sep``-separated part must be a name without
    whitespace (``"a..b"``, ``".a"``, ``"a/"`` or ``"a b"`` name no module).
    """
    example = "encoder.layer.0" if sep == "." else "encoder/layer_0"
    if not isinstance(value, str):
        return [f"{field} must be a str module path such as {example!r}, got {type(value).__name__} {value!r}"]
    if value and any(not part or any(c.isspace() for c in part) for part in value.split(sep)):
        return [f"{field} path {value!r} has an empty part or whitespace; join module names with {sep!r}, e.g. {example!r}"]
    return []


def _bias_problems(bias: object) -> list[str]:
    return [] if isinstance(bias, bool) else [f"bias must be True or False, got {bias!r}"]


def _heads_problems(heads: object) -> list[str]:
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        return [f"heads must be an int >= 1, got {heads!r}"]
    return []


def _t2(a: Array) -> Array:
    return a.T


_TO_FLAX = {
    "same": lambda a: a,
    "linear": _t2,  # (out, in) -> (in, out)
    "conv": lambda a: a.transpose(2, 3, 1, 0),  # OIHW -> HWIO
}
_FROM_FLAX = {
    "same": lambda a: a,
    "linear": _t2,
    "conv": lambda a: a.transpose(3, 2, 0, 1),  # HWIO -> OIHW
}


@dataclass(frozen=True)
class Dense(Rule):
    """torch ``Linear.weight`` (out, in) <-> flax ``Dense.kernel`` (in, out); bias as is."""

    bias: bool = True

    def problems(self) -> list[str]:
        return super().problems() + _bias_problems(self.bias)

    def pairs(self) -> list[tuple[str, str, str]]:
        out = [(_join(self.torch, "weight"), _fjoin("params", self.flax, "kernel"), "linear")]
        if self.bias:
            out.append((_join(self.torch, "bias"), _fjoin("params", self.flax, "bias"), "same"))
        return out


@dataclass(frozen=True)
class Conv(Rule):
    """torch ``Conv2d.weight`` OIHW <-> flax ``Conv.kernel`` HWIO; bias as is."""

    bias: bool = True

    def problems(self) -> list[str]:
        return super().problems() + _bias_problems(self.bias)

    def pairs(self) -> list[tuple[str, str, str]]:
        out = [(_join(self.torch, "weight"), _fjoin("params", self.flax, "kernel"), "conv")]
        if self.bias:
            out.append((_join(self.torch, "bias"), _fjoin("params", self.flax, "bias"), "same"))
        return out


@dataclass(frozen=True)
class BatchNorm(Rule):
    """weight/bias/running_mean/running_var <-> params scale/bias + batch_stats mean/var."""

    def pairs(self) -> list[tuple[str, str, str]]:
        return [
            (_join(self.torch, "weight"), _fjoin("params", self.flax, "scale"), "same"),
            (_join(self.torch, "bias"), _fjoin("params", self.flax, "bias"), "same"),
            (_join(self.torch, "running_mean"), _fjoin("batch_stats", self.flax, "mean"), "same"),
            (_join(self.torch, "running_var"), _fjoin("batch_stats", self.flax, "var"), "same"),
        ]


@dataclass(frozen=True)
class LayerNorm(Rule):
    """weight/bias <-> scale/bias."""

    def pairs(self) -> list[tuple[str, str, str]]:
        return [
            (_join(self.torch, "weight"), _fjoin("params", self.flax, "scale"), "same"),
            (_join(self.torch, "bias"), _fjoin("params", self.flax, "bias"), "same"),
        ]


@dataclass(frozen=True)
class Embedding(Rule):
    """torch ``Embedding.weight`` (num, dim) <-> flax ``Embed.embedding`` (num, dim)."""

    def pairs(self) -> list[tuple[str, str, str]]:
        return [(_join(self.torch, "weight"), _fjoin("params", self.flax, "embedding"), "same")]


def _heads_mismatch(width: int, heads: int) -> UsageError:
    # Shapes reaching a rule were checked against the model's own build, so a width that
    # does not split into ``heads`` means the rule's ``heads`` is not the model's.
    return UsageError(
        f"attention layout rule: projection width {width} is not divisible by {heads} heads; "
        "set the rule's heads= to the model's number of attention heads"
    )


def _heads_split(kernel_t: Array, heads: int) -> Array:
    """torch (H*D, E) projection weight -> flax DenseGeneral kernel (E, H, D)."""
    hd, e = kernel_t.shape
    if hd % heads:
        raise _heads_mismatch(hd, heads)
    return kernel_t.T.reshape(e, heads, hd // heads)


def _heads_merge(kernel: Array) -> Array:
    """flax DenseGeneral kernel (E, H, D) -> torch (H*D, E)."""
    e, h, d = kernel.shape
    return kernel.reshape(e, h * d).T


def _out_split(weight: Array, heads: int) -> Array:
    """torch out-projection weight (E, H*D) -> flax (H, D, E)."""
    e, hd = weight.shape
    if hd % heads:
        raise _heads_mismatch(hd, heads)
    return weight.T.reshape(heads, hd // heads, e)


def _out_merge(kernel: Array) -> Array:
    """flax out kernel (H, D, E) -> torch (E, H*D)."""
    h, d, e = kernel.shape
    return kernel.reshape(h * d, e).T


def _bias_split(bias: Array, heads: int) -> Array:
    (hd,) = bias.shape
    if hd % heads:
        raise _heads_mismatch(hd, heads)
    return bias.reshape(heads, hd // heads)


def _bias_merge(bias: Array) -> Array:
    h, d = bias.shape
    return bias.reshape(h * d)


_PROJ = ("query", "key", "value")


@dataclass(frozen=True)
class Attention(Rule):
    """Separate torch q/k/v/out ``Linear`` layers <-> flax ``MultiHeadDotProductAttention``.

    The four torch prefixes are given explicitly (HF BERT: ``...attention.self.query``,
    ``...attention.output.dense``); an empty one defaults to ``<torch>.<query|key|value|out>``.
    Flax kernels are DenseGeneral: query/key/value ``(E, H, D)``, bias ``(H, D)``;
    out ``(H, D, E)``, bias ``(E,)``.
    """

    query: str = ""
    key: str = ""
    value: str = ""
    out: str = ""
    heads: int = 1
    bias: bool = True

    def problems(self) -> list[str]:
        out = super().problems() + _heads_problems(self.heads) + _bias_problems(self.bias)
        for which in (*_PROJ, "out"):
            out += _path_problems(which, getattr(self, which), ".")
        return out

    def _torch(self, which: str) -> str:
        given = getattr(self, which)
        return given or _join(self.torch, which)

    def pairs(self) -> list[tuple[str, str, str]]:
        out: list[tuple[str, str, str]] = []
        for which in (*_PROJ, "out"):
            sub = _fjoin("", self.flax, which)
            out.append((_join(self._torch(which), "weight"), _fjoin("params", sub, "kernel"), which))
            if self.bias:
                out.append((_join(self._torch(which), "bias"), _fjoin("params", sub, "bias"), which))
        return out

    def to_flax(self, canonical: Mapping[str, Array]) -> dict[str, Array]:
        res: dict[str, Array] = {}
        for c, f, which in self.pairs():
            a = canonical[c]
            if c.endswith("weight"):
                res[f] = _out_split(a, self.heads) if which == "out" else _heads_split(a, self.heads)
            else:
                res[f] = a if which == "out" else _bias_split(a, self.heads)
        return res

    def from_flax(self, flat: Mapping[str, Array]) -> dict[str, Array]:
        res: dict[str, Array] = {}
        for c, f, which in self.pairs():
            a = flat[f]
            if f.endswith("kernel"):
                res[c] = _out_merge(a) if which == "out" else _heads_merge(a)
            else:
                res[c] = a if which == "out" else _bias_merge(a)
        return res


@dataclass(frozen=True)
class PackedAttention(Rule):
    """torch ``nn.MultiheadAttention`` (``in_proj_weight`` (3E, E), ``in_proj_bias``,
    ``out_proj.weight``/``out_proj.bias``) <-> flax ``MultiHeadDotProductAttention``."""

    heads: int = 1
    bias: bool = True

    def problems(self) -> list[str]:
        return super().problems() + _heads_problems(self.heads) + _bias_problems(self.bias)

    def canonical(self) -> list[str]:
        names = [_join(self.torch, "in_proj_weight"), _join(self.torch, "out_proj.weight")]
        if self.bias:
            names += [_join(self.torch, "in_proj_bias"), _join(self.torch, "out_proj.bias")]
        return names

    def _inner(self) -> Attention:
        return Attention(torch=self.torch, flax=self.flax, heads=self.heads, bias=self.bias)

    def flax_keys(self) -> list[str]:
        return self._inner().flax_keys()

    def to_flax(self, canonical: Mapping[str, Array]) -> dict[str, Array]:
        w = canonical[_join(self.torch, "in_proj_weight")]
        if w.shape[0] % 3:
            raise UsageError(
                f"layout rule {self!r}: in_proj_weight has {w.shape[0]} rows, not divisible by 3 (packed query, key, value); "
                "use Attention for separate projections"
            )
        n = w.shape[0] // 3
        split: dict[str, Array] = {}
        inner = self._inner()
        for i, which in enumerate(_PROJ):
            split[_join(inner._torch(which), "weight")] = w[i * n : (i + 1) * n]
            if self.bias:
                split[_join(inner._torch(which), "bias")] = canonical[_join(self.torch, "in_proj_bias")][i * n : (i + 1) * n]
        split[_join(inner._torch("out"), "weight")] = canonical[_join(self.torch, "out_proj.weight")]
        if self.bias:
            split[_join(inner._torch("out"), "bias")] = canonical[_join(self.torch, "out_proj.bias")]
        return inner.to_flax(split)

    def from_flax(self, flat: Mapping[str, Array]) -> dict[str, Array]:
        inner = self._inner()
        split = inner.from_flax(flat)
        res = {
            _join(self.torch, "in_proj_weight"): np.concatenate(
                [np.asarray(split[_join(inner._torch(w), "weight")]) for w in _PROJ], axis=0
            ),
            _join(self.torch, "out_proj.weight"): split[_join(inner._torch("out"), "weight")],
        }
        if self.bias:
            res[_join(self.torch, "in_proj_bias")] = np.concatenate(
                [np.asarray(split[_join(inner._torch(w), "bias")]) for w in _PROJ], axis=0
            )
            res[_join(self.torch, "out_proj.bias")] = split[_join(inner._torch("out"), "bias")]
        return res


# ---------------------------------------------------------------------------------------
# Whole-model conversion
# ---------------------------------------------------------------------------------------


def rule_problems(rules: Iterable[object]) -> list[str]:
    """What is wrong with a model's layout as a whole (empty: nothing).

    Every entry must be a :class:`Rule` (each checks its own fields when it is made), and no
    canonical name or flax key may be owned by two rules.
    """
    problems: list[str] = []
    owner: dict[str, Rule] = {}
    flax_owner: dict[str, Rule] = {}
    for i, r in enumerate(rules):
        if not isinstance(r, Rule):
            problems.append(f"layout entry {i} is not an exporter.layouts.Rule: {type(r).__name__} {r!r}")
            continue
        for n in r.canonical():
            if n in owner:
                problems.append(f"canonical name {n!r} is owned by two rules: {owner[n]!r} and {r!r}")
            owner.setdefault(n, r)
        for f in r.flax_keys():
            if f in flax_owner:
                problems.append(f"flax key {f!r} is owned by two rules: {flax_owner[f]!r} and {r!r}")
            flax_owner.setdefault(f, r)
    return problems


def _checked(rules: Iterable[Rule]) -> None:
    problems = rule_problems(rules)
    if problems:
        raise UsageError.listing("bad layout rules", problems)


def canonical_names(rules: tuple[Rule, ...] | list[Rule]) -> list[str]:
    """Sorted canonical names owned by ``rules``.

    Args:
        rules: the layout rules of a model (``spec.layout``).

    Returns:
        Sorted canonical (torch-style dotted) names.

    Raises:
        UsageError: an entry is not a Rule, or two rules own the same name.
    """
    _checked(rules)
    return sorted(n for r in rules for n in r.canonical())


def flax_names(rules: tuple[Rule, ...] | list[Rule]) -> list[str]:
    """Sorted flat flax keys (``"params/..."``, ``"batch_stats/..."``) owned by ``rules``.

    Raises:
        UsageError: an entry is not a Rule, or two rules own the same key.
    """
    _checked(rules)
    return sorted(n for r in rules for n in r.flax_keys())


def _contiguous(a: Array) -> np.ndarray:
    return np.asarray(a, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)


def _check_keys(have: Iterable[str], want: Iterable[str], what: str) -> None:
    have_s, want_s = set(have), set(want)
    problems = [f"missing {what} key {k!r}" for k in want_s - have_s]
    problems += [f"unexpected {what} key {k!r} (no layout rule owns it)" for k in have_s - want_s]
    if problems:
        raise StateMismatchError(
            format_problems(
                f"state does not match the model's layout ({len(problems)} problem(s)); "
                "run it through exporter.rebuild.prepare_state to strip prefixes and rename keys",
                problems,
            )
        )


def to_flax_flat(canonical: Mapping[str, Array], rules: tuple[Rule, ...] | list[Rule]) -> dict[str, np.ndarray]:
    """Canonical state -> flat flax dict (``"params/a/b"`` keys), contiguous numpy copies.

    Raises:
        StateMismatchError: ``canonical`` misses a name the rules need or holds one they do not own.
    """
    _check_keys(canonical, canonical_names(rules), "canonical")
    flat: dict[str, np.ndarray] = {}
    for r in rules:
        for k, v in r.to_flax(canonical).items():
            flat[k] = _contiguous(v)
    return flat


def from_flax_flat(flat: Mapping[str, Array], rules: tuple[Rule, ...] | list[Rule]) -> dict[str, np.ndarray]:
    """Flat flax dict -> canonical state (contiguous numpy copies).

    Raises:
        StateMismatchError: ``flat`` misses a flax key the rules need or holds one they do not own.
    """
    _check_keys(flat, flax_names(rules), "flax")
    out: dict[str, np.ndarray] = {}
    for r in rules:
        for k, v in r.from_flax({f: np.asarray(flat[f]) for f in r.flax_keys()}).items():
            out[k] = _contiguous(v)
    return out


def to_flax(canonical: Mapping[str, Array], rules: tuple[Rule, ...] | list[Rule]) -> dict[str, Any]:
    """Canonical state -> nested flax variables ``{"params": {...}, "batch_stats": {...}}``.

    Args:
        canonical: torch-style dotted names -> arrays (numpy or anything ``np.asarray`` takes).
        rules: the model's layout rules.

    Returns:
        Nested dict of numpy arrays; collections without entries are left out.

    Raises:
        StateMismatchError: a name is missing or not owned by any rule.
    """
    return unflatten_flax(to_flax_flat(canonical, rules))


def from_flax(variables: Mapping[str, Any], rules: tuple[Rule, ...] | list[Rule]) -> dict[str, np.ndarray]:
    """Nested (or already flat) flax variables -> canonical state.

    Args:
        variables: ``{"params": ..., "batch_stats": ...}`` (nested dicts / FrozenDicts of arrays),
            or a flat dict with ``"params/a/b"`` keys.
        rules: the model's layout rules.

    Returns:
        Canonical state (numpy arrays, contiguous).

    Raises:
        StateMismatchError: a flax key is missing or not owned by any rule.
    """
    flat = dict(variables) if _is_flat(variables) else flatten_flax(variables)
    return from_flax_flat(flat, rules)


def flax_shapes(
    shapes: Mapping[str, tuple[tuple[int, ...], str]], rules: tuple[Rule, ...] | list[Rule]
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Map canonical ``name -> (shape, dtype)`` to flat flax ``key -> (shape, dtype)``.

    Uses zero-stride dummy arrays, so it allocates nothing proportional to the model.
    Rules whose canonical names are missing from ``shapes`` are skipped.
    """
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for r in rules:
        if not all(c in shapes for c in r.canonical()):
            continue
        dummies = {c: np.broadcast_to(np.zeros((), dtype=shapes[c][1]), shapes[c][0]) for c in r.canonical()}
        for k, v in r.to_flax(dummies).items():
            out[k] = (tuple(int(d) for d in v.shape), str(v.dtype))
    return out


def _is_flat(tree: Mapping[str, Any]) -> bool:
    return all(not isinstance(v, Mapping) for v in tree.values())


def flatten_flax(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested flax variables -> ``{"params/a/b": array}`` (numpy; FrozenDict and jax arrays accepted)."""
    flat: dict[str, np.ndarray] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping) or hasattr(node, "items") and not hasattr(node, "shape"):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            assert prefix, "a bare array is not a variables tree"
            flat[prefix] = np.asarray(node)

    walk("", variables)
    return flat


def unflatten_flax(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"params/a/b": array}`` -> nested ``{"params": {"a": {"b": array}}}`` (plain dicts)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split("/")
        node = tree
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            assert isinstance(nxt, dict), f"flax key {key!r} collides with a leaf at {p!r}"
            node = nxt
        assert parts[-1] not in node, f"flax key {key!r} given twice"
        node[parts[-1]] = value
    return tree


def is_flax_layout(keys: Iterable[str]) -> bool:
    """True when ``keys`` look like flat flax variables (``"params/..."`` or '/'-paths, no dots).

    Torch names are dotted (``hidden.weight``); flax flat keys are '/'-joined
    (``params/hidden/kernel``).  A key set is flax layout when every key holds a '/', or any
    key starts with a known collection (``params/``, ``batch_stats/``).
    """
    keys = list(keys)
    if not keys:
        return False
    if any(k.split("/", 1)[0] in COLLECTIONS and "/" in k for k in keys):
        return True
    return all("/" in k for k in keys)
