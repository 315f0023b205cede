"""Config-driven model families: one architecture, its size set by a config.

A :class:`Family` is an architecture (``bert``, ``gpt2``, ``resnet``) whose hyperparameters
come from a config: for Hugging Face layouts the ``config.json`` beside the checkpoint,
or any JSON file given with ``--config FILE``.  The family declares its fields
(:class:`Field`: type, range, allowed values, default), checks a config against them,
collecting every problem into one ``UsageError``, and makes the ``ModelSpec`` of a valid
config::

    fam = get_family("gpt2")
    resolved = fam.resolve(checkpoint="ckpt_dir")      # reads ckpt_dir/config.json
    resolved.spec                                       # a ModelSpec sized by that config
    resolved.record()                                   # what the bundle manifest records

A family is registered in the model registry under its own name with its *default* config
(:meth:`Family.register`), so ``registry.get("gpt2")`` and every test parametrised over
``registry.names()`` see it like any other model.  A config names the architecture's
fields with the config's own keys (HF's ``n_embd``, ``hidden_size``); keys the family
does not know (dropout rates, token ids, ``architectures``) are ignored and listed in the
record, because a config.json carries many that do not change the computation.  A field
that *would* change it but that the build does not implement is declared with the only
value the build supports (``choices``), so such a config is refused, not misread.

One spec object exists per distinct config (cached), so specs made from configs can be
compared and cached by identity like the builtins.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exporter.errors import UnknownModelError, UsageError
from exporter.hashing import sha256_bytes
from exporter.models.registry import ModelSpec, register

__all__ = [
    "REQUIRED",
    "CONFIG_FILE",
    "MAPPING_SOURCE",
    "Field",
    "Family",
    "FamilySpec",
    "ResolvedConfig",
    "register_family",
    "get_family",
    "families",
    "is_family",
    "read_config",
    "config_record",
    "hf_weights",
    "WEIGHT_FILES",
]

#: The config file a Hugging Face checkpoint directory carries.
CONFIG_FILE = "config.json"

#: ``ResolvedConfig.source`` of a config given as a mapping (``export(config={...})``).
MAPPING_SOURCE = "<mapping>"

#: The weights file of a (not sharded) Hugging Face model directory, in the order looked for.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

#: Configs larger than this are not configs (HF's are a few KiB).
_MAX_CONFIG_BYTES = 1 << 20


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: Default of a field that every config must give.
REQUIRED: Any = _Required()

_KINDS = {int: "an int", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Field:
    """One hyperparameter of a family.

    Attributes:
        name: the config key (HF's name, e.g. ``"n_embd"``).
        kind: ``int``, ``float``, ``bool`` or ``str`` (a float field accepts an int).
        default: the value when the config does not give it; :data:`REQUIRED`: it must.
        help: one line for ``list``.
        minimum: smallest allowed value (numbers); ``None``: no bound.
        exclusive_minimum: ``minimum`` itself is not allowed (``eps > 0``).
        choices: the only allowed values (e.g. the activations the build implements).
        nullable: ``null`` is allowed (then the family derives the value, e.g. ``n_inner``).
    """

    name: str
    kind: type
    default: Any = REQUIRED
    help: str = ""
    minimum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[Any, ...] = ()
    nullable: bool = False

    def __post_init__(self) -> None:
        assert self.kind in _KINDS, self.kind
        assert self.default is REQUIRED or self.default is None and self.nullable or not self.problems(self.default), self

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def problems(self, value: Any) -> list[str]:
        """What is wrong with ``value`` for this field (empty: nothing)."""
        if value is None:
            return [] if self.nullable else [f"field {self.name!r} is null; expected {self.describe()}"]
        ok_type = (
            isinstance(value, bool)
            if self.kind is bool
            else isinstance(value, self.kind) and not isinstance(value, bool)
            or self.kind is float and isinstance(value, int) and not isinstance(value, bool)
        )
        if not ok_type:
            return [f"field {self.name!r} is {json.dumps(value)} ({type(value).__name__}); expected {self.describe()}"]
        if self.kind is float and not math.isfinite(value):
            return [f"field {self.name!r} is {value!r}; expected a finite number"]
        if self.choices and value not in self.choices:
            allowed = ", ".join(json.dumps(c) for c in self.choices)
            return [f"field {self.name!r} is {json.dumps(value)}; this build supports only: {allowed}"]
        if self.minimum is not None and (value < self.minimum or self.exclusive_minimum and value == self.minimum):
            op = ">" if self.exclusive_minimum else ">="
            return [f"field {self.name!r} is {json.dumps(value)}; expected {op} {self.minimum:g}"]
        return []

    def describe(self) -> str:
        """``"an int >= 1"``, ``"one of "gelu", "relu""``."""
        if self.choices:
            text = "one of " + ", ".join(json.dumps(c) for c in self.choices)
        else:
            text = _KINDS[self.kind]
            if self.minimum is not None:
                text += f" {'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        return text + (" or null" if self.nullable else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind.__name__,
            "required": self.required,
            "default": None if self.required else self.default,
            "allowed": self.describe(),
            "help": self.help,
        }


@dataclass(frozen=True)
class FamilySpec(ModelSpec):
    """A ``ModelSpec`` made by a family from one config.

    Attributes:
        family: the family's name.
        config: the validated config (every field of the family, defaults filled in).
    """

    family: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated config and the spec it makes.

    Attributes:
        family: the family's name.
        values: every field of the family (defaults filled in), in field order.
        source: the config file's path, :data:`MAPPING_SOURCE` for a mapping given in
            Python, or ``None`` for the family's default config.
        sha256: sha256 of the config file's bytes (of the canonical JSON of the mapping, or
            of ``values`` for the default config).
        ignored: keys of the file that the family does not read (sorted).
        spec: the ModelSpec of this config.
    """

    family: str
    values: Mapping[str, Any]
    source: str | None
    sha256: str
    ignored: tuple[str, ...]
    spec: ModelSpec

    def record(self) -> dict[str, Any]:
        """JSON-ready provenance for the bundle manifest."""
        return {
            "family": self.family,
            "source": self.source if self.source is not None else "default",
            "sha256": self.sha256,
            "values": dict(self.values),
            "ignored_keys": list(self.ignored),
        }


def _canonical_json(values: Mapping[str, Any]) -> str:
    return json.dumps(dict(values), sort_keys=True, separators=(",", ":"))


def hf_weights(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The weights file of a Hugging Face model directory (what ``save_pretrained`` writes:
    ``config.json`` beside ``model.safetensors`` or ``pytorch_model.bin``), else ``None``
    (a file, a sharded checkpoint with its index, any other directory)."""
    d = Path(checkpoint)
    if not d.is_dir() or not (d / CONFIG_FILE).is_file() or any(d.glob("*.index.json")):
        return None
    return next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)


def read_config(path: str | os.PathLike[str]) -> tuple[dict[str, Any], bytes]:
    """Read a JSON config file: ``(object, raw bytes)``.

    Raises:
        UsageError: the file is missing, a directory, too large, not UTF-8 JSON, or not an object.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"config file {str(p)!r} does not exist; pass a JSON file such as a checkpoint's {CONFIG_FILE}")
    if p.is_dir():
        hint = f" (did you mean {str(p / CONFIG_FILE)!r}?)" if (p / CONFIG_FILE).is_file() else ""
        raise UsageError(f"config {str(p)!r} is a directory; pass a JSON file{hint}")
    size = p.stat().st_size
    if size > _MAX_CONFIG_BYTES:
        raise UsageError(f"config file {str(p)!r} is {size} bytes; a model config is a small JSON object (at most {_MAX_CONFIG_BYTES})")
    raw = p.read_bytes()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"config file {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"config file {str(p)!r} holds a JSON {type(obj).__name__}; expected an object of field -> value")
    return obj, raw


@dataclass(frozen=True, eq=False)
class Family:
    """An architecture whose size comes from a config.

    Attributes:
        name: registry name of the family (its default config's spec is registered under it).
        summary: one line for ``list``.
        fields: the hyperparameters, in the order ``list`` shows them.
        make_spec: ``(name, values) -> ModelSpec`` for validated ``values`` (every field
            present); must return a :class:`FamilySpec` (``family``/``config`` set).
        default: the default config (field -> value; fields left out take their defaults).
        check: cross-field checks ``values -> problems`` (``n_embd`` divisible by ``n_head``).
    """

    name: str
    summary: str
    fields: tuple[Field, ...]
    make_spec: Callable[[str, Mapping[str, Any]], ModelSpec]
    default: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any]], list[str]] | None = None
    _specs: dict[str, ModelSpec] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        assert len(names) == len(set(names)), f"{self.name}: a field is declared twice"

    # -- validation -------------------------------------------------------------------
    def validate(self, config: Mapping[str, Any], source: str | None = None) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Check ``config`` against the fields; fill in defaults.

        Args:
            config: field -> value (e.g. a parsed config.json).
            source: where it came from, for the message.

        Returns:
            ``(values, ignored)``: every field in declaration order, and the config's keys
            the family does not read (sorted).

        Raises:
            UsageError: every missing required field, wrong type, out-of-range or
                unsupported value, and failed cross-field check, listed at once.
        """
        if not isinstance(config, Mapping):
            raise UsageError(f"config for family {self.name!r} must be a mapping of field -> value, got {type(config).__name__}")
        problems: list[str] = []
        values: dict[str, Any] = {}
        for f in self.fields:
            if f.name not in config:
                if f.required:
                    problems.append(f"missing field {f.name!r} ({f.describe()}{': ' + f.help if f.help else ''})")
                else:
                    values[f.name] = f.default
                continue
            bad = f.problems(config[f.name])
            problems += bad
            if not bad:
                v = config[f.name]
                values[f.name] = float(v) if f.kind is float and v is not None else v
        if not problems and self.check is not None:
            problems += self.check(values)
        if problems:
            where = f"config {source!r}" if source else "config"
            raise UsageError.listing(
                f"{where} does not describe a valid {self.name!r} model ({len(problems)} problem(s)); "
                f"fix the config's fields (see `python -m exporter list` for the {self.name!r} fields)",
                problems,
            )
        known = {f.name for f in self.fields}
        ignored = tuple(sorted(str(k) for k in config if k not in known))
        return values, ignored

    def default_values(self) -> dict[str, Any]:
        """The validated default config."""
        values, _ = self.validate(dict(self.default), source=f"default config of {self.name!r}")
        return values

    # -- specs ------------------------------------------------------------------------
    def spec(self, config: Mapping[str, Any] | None = None, *, source: str | None = None) -> ModelSpec:
        """The spec of ``config`` (default config when None), one object per distinct config.

        Raises:
            UsageError: the config is not valid (every problem listed).
        """
        values = self.default_values() if config is None else self.validate(config, source)[0]
        return self._spec_of(values)

    def named(self, name: str, config: Mapping[str, Any], **overrides: Any) -> ModelSpec:
        """The spec of ``config`` under another registry name (``minilm`` is ``bert``'s
        all-MiniLM-L6-v2 config), with ``ModelSpec`` fields overridden (``summary=``).

        Raises:
            UsageError: the config is not valid.
        """
        values, _ = self.validate(config, f"config of model {name!r}")
        return self._spec_of(values, name, overrides)

    def _spec_of(self, values: Mapping[str, Any], name: str | None = None, overrides: Mapping[str, Any] | None = None) -> ModelSpec:
        name = name or self.name
        key = json.dumps([name, _canonical_json(values), sorted((k, repr(v)) for k, v in (overrides or {}).items())])
        if key not in self._specs:
            spec = self.make_spec(name, dict(values))
            if overrides:
                spec = replace(spec, **overrides)
            assert isinstance(spec, FamilySpec) and spec.family == self.name and dict(spec.config) == dict(values), spec.name
            self._specs[key] = spec
        return self._specs[key]

    def resolve(
        self,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    ) -> ResolvedConfig:
        """Find, read and validate the config for an export.

        Order: ``config`` (a file path, or a mapping), else ``config.json`` beside the
        checkpoint (in it when it is a directory, else in its directory), else the family's
        default config.

        Args:
            checkpoint: the checkpoint file or directory being exported, if any.
            config: an explicit config file (``--config FILE``) or mapping.

        Returns:
            The :class:`ResolvedConfig` (spec, values, source, sha256).

        Raises:
            UsageError: the config file cannot be read or the config is not valid.
        """
        if isinstance(config, Mapping):
            values, ignored = self.validate(config, "given mapping")
            digest = sha256_bytes(_canonical_json(config).encode())
            return ResolvedConfig(self.name, values, MAPPING_SOURCE, digest, ignored, self._spec_of(values))
        path: Path | None = Path(config) if config is not None else None
        if path is None and checkpoint is not None:
            ck = Path(checkpoint)
            beside = (ck if ck.is_dir() else ck.parent) / CONFIG_FILE
            path = beside if beside.is_file() else None
        if path is None:
            values = self.default_values()
            return ResolvedConfig(self.name, values, None, sha256_bytes(_canonical_json(values).encode()), (), self._spec_of(values))
        obj, raw = read_config(path)
        values, ignored = self.validate(obj, str(path))
        return ResolvedConfig(self.name, values, str(path), sha256_bytes(raw), ignored, self._spec_of(values))

    def register(self) -> ModelSpec:
        """Register the default config's spec under the family's name (and the family itself)."""
        register_family(self)
        return register(self.spec())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for ``list``: name, summary, fields, default config."""
        return {
            "name": self.name,
            "summary": self.summary,
            "fields": [f.to_dict() for f in self.fields],
            "default": self.default_values(),
        }


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to the family table; refuses a second family of the same name."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise UsageError(f"family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The family called ``name``.

    Raises:
        UnknownModelError: no such family (lists the known ones).
    """
    from exporter.models import registry

    registry.names()  # loads the builtins, which register their families
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnknownModelError(
            f"{name!r} is not a model family; families (models sized by a config): {', '.join(sorted(_FAMILIES)) or '(none)'}"
        ) from None


def is_family(name: str) -> bool:
    """Whether ``name`` is a family (after loading the builtins)."""
    from exporter.models import registry

    registry.names()
    return name in _FAMILIES


def config_record(spec: ModelSpec) -> dict[str, Any] | None:
    """The manifest's config record of a spec that one family made (``minilm``: bert's
    all-MiniLM-L6-v2 config), with ``source`` ``"builtin"``; ``None`` for other specs."""
    if not isinstance(spec, FamilySpec) or not spec.family:
        return None
    values = dict(spec.config)
    return {
        "family": spec.family,
        "source": "builtin" if spec.name != spec.family else "default",
        "sha256": sha256_bytes(_canonical_json(values).encode()),
        "values": values,
        "ignored_keys": [],
    }


def families() -> list[Family]:
    """Every registered family, sorted by name."""
    from exporter.models import registry

    registry.names()
    return [_FAMILIES[n] for n in sorted(_FAMILIES)]
