"""The one error tree of exporter.

Every problem a *user* can cause (bad input, bad usage, a failed parity check) is an
``ExporterError``; a bug in exporter itself is an ``AssertionError`` (or any other
exception), and propagates as one.  The CLI catches only ``ExporterError``, prints
``Type: message`` and exits with ``exit_code``.

    ExporterError                     exit 2 unless noted
    ├── UsageError                    bad arguments / options / a bad user-written ModelSpec or layout rule
    ├── UnknownModelError             a registry name that does not exist (lists the known ones)
    ├── MissingDependencyError        an optional framework/tool is not installed (names the extra)
    ├── StateFileError                a state file that cannot be read (truncated, unknown format, unsafe)
    ├── StateMismatchError            state that does not fit the model (missing/unexpected/shape/dtype)
    ├── CheckpointError               a checkpoint cannot be written, found or resumed (e.g. no free space)
    │   └── CheckpointCorruptError    a training checkpoint that fails its manifest/hash checks
    ├── BundleError                   a bundle directory that is corrupt or incomplete (re-export it)
    ├── ExportError                   the ONNX exporter failed, or its output cannot be loaded
    ├── RunError                      a runtime failed to run a case (onnxruntime, node, ...)
    └── ParityError                   exit 1: outputs out of tolerance / verification failed

``CheckpointCorruptError`` is a ``CheckpointError`` (what users catch around resume) and
also a ``StateFileError``: exporting from a damaged training checkpoint is a bad state
file like any other, so code that catches either sees it.

``RunError`` is what an adapter raises when the runtime *itself* cannot run a case; the
parity sweep turns exactly that (and nothing else) into a failing check.  Any other
exception from an adapter is a bug and propagates.

Messages name the subject (file, key, model), the problem, what was expected and the fix.
Where several things are wrong, all of them are collected, one per line, sorted; the
message shows at most :data:`MAX_LISTED` per category ("... and N more"), the exception's
``problems`` attribute (and the CLI's ``--json``) keeps the full list.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "MAX_LISTED",
    "ExporterError",
    "UsageError",
    "UnknownModelError",
    "MissingDependencyError",
    "StateFileError",
    "CheckpointCorruptError",
    "StateMismatchError",
    "CheckpointError",
    "BundleError",
    "ExportError",
    "RunError",
    "ParityError",
    "format_problems",
]

#: At most this many lines per category of problem are shown in a message.
MAX_LISTED = 20


class ExporterError(Exception):
    """Base class of every error exporter raises for a user's input or environment.

    Attributes:
        problems: every problem found, sorted (the message may show only the first
            :data:`MAX_LISTED` of each category).
    """

    exit_code: int = 2

    def __init__(self, *args: object, problems: Iterable[str] = ()) -> None:
        super().__init__(*args)
        self.problems: tuple[str, ...] = tuple(problems)

    @classmethod
    def listing(cls, header: str, problems: Iterable[str], **kwargs: object) -> ExporterError:
        """The error with ``header`` and the capped, sorted problem list as its message;
        the full sorted list stays in ``problems``."""
        lines = sorted(set(problems))
        return cls(format_problems(header, lines), problems=lines, **kwargs)  # type: ignore[arg-type]


class UsageError(ExporterError):
    """Bad command-line usage, bad arguments to an API function, or a bad user-written spec."""


class UnknownModelError(ExporterError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(ExporterError, ImportError):
    """An optional dependency is missing; the message names what to install."""


class StateFileError(ExporterError):
    """A state/checkpoint file that cannot be read safely."""


class StateMismatchError(ExporterError):
    """Saved state that does not match the model's expected parameters."""


class CheckpointError(ExporterError):
    """A training checkpoint cannot be written, found or resumed."""


class CheckpointCorruptError(CheckpointError, StateFileError):
    """A training checkpoint whose manifest or content hashes do not check out."""


class BundleError(ExporterError):
    """A bundle directory that is not a bundle, or is corrupt or incomplete."""


class ExportError(ExporterError):
    """Exporting a model to ONNX failed, or the runtime cannot load what was exported."""


class RunError(ExporterError):
    """A runtime could not run one case (its own error, e.g. a Reshape with a baked-in size)."""


class ParityError(ExporterError):
    """Outputs of an export differ from the reference beyond tolerance."""

    exit_code = 1


def _category(line: str) -> str:
    """The first word of a problem line (``missing``, ``unexpected``, ``tensor``...)."""
    word = line.split(" ", 1)[0]
    return word.rstrip(":")


def format_problems(header: str, problems: Iterable[str], *, limit: int = MAX_LISTED) -> str:
    """One header line, then the problems on indented lines, sorted and de-duplicated.

    At most ``limit`` lines per category (a line's first word) are shown; the rest of a
    category is summarised as ``... and N more <category>``.
    """
    lines = sorted(set(problems))
    shown: list[str] = []
    hidden: dict[str, int] = {}
    counts: dict[str, int] = {}
    for line in lines:
        cat = _category(line)
        counts[cat] = counts.get(cat, 0) + 1
        if counts[cat] <= limit:
            shown.append(line)
        else:
            hidden[cat] = hidden.get(cat, 0) + 1
    shown += [f"... and {n} more {cat}" for cat, n in sorted(hidden.items())]
    return header + "".join(f"\n  - {line}" for line in shown)
