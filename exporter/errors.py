"""The one error tree of exporter.

Every problem a *user* can cause (bad input, bad usage, a failed parity check) is an
``ExporterError``; a bug in exporter itself is an ``AssertionError``.  The CLI catches
only ``ExporterError``, prints ``Type: message`` and exits with ``exit_code``.

    ExporterError                  exit 2 unless noted
    ├── UsageError                 bad arguments / options
    ├── UnknownModelError          a registry name that does not exist (lists the known ones)
    ├── MissingDependencyError     an optional framework/tool is not installed (names the extra)
    ├── StateFileError             a state file that cannot be read (truncated, unknown format, unsafe)
    │   └── CheckpointCorruptError a training checkpoint that fails its manifest/hash checks
    ├── StateMismatchError         state that does not fit the model (missing/unexpected/shape/dtype)
    ├── CheckpointError            a checkpoint cannot be written or resumed (e.g. no free space)
    ├── ExportError                the ONNX exporter failed
    └── ParityError                exit 1: outputs out of tolerance / verification failed

Messages name the subject (file, key, model), the problem, what was expected and the fix.
Where several things are wrong, all of them are collected, one per line, sorted.
"""

from __future__ import annotations

__all__ = [
    "ExporterError",
    "UsageError",
    "UnknownModelError",
    "MissingDependencyError",
    "StateFileError",
    "CheckpointCorruptError",
    "StateMismatchError",
    "CheckpointError",
    "ExportError",
    "ParityError",
    "format_problems",
]


class ExporterError(Exception):
    """Base class of every error exporter raises for a user's input or environment."""

    exit_code: int = 2


class UsageError(ExporterError):
    """Bad command-line usage or bad arguments to an API function."""


class UnknownModelError(ExporterError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(ExporterError, ImportError):
    """An optional dependency is missing; the message names what to install."""


class StateFileError(ExporterError):
    """A state/checkpoint file that cannot be read safely."""


class CheckpointCorruptError(StateFileError):
    """A training checkpoint whose manifest or content hashes do not check out."""


class StateMismatchError(ExporterError):
    """Saved state that does not match the model's expected parameters."""


class CheckpointError(ExporterError):
    """A training checkpoint cannot be written, found or resumed."""


class ExportError(ExporterError):
    """Exporting a model to ONNX failed."""


class ParityError(ExporterError):
    """Outputs of an export differ from the reference beyond tolerance."""

    exit_code = 1


def format_problems(header: str, problems: list[str] | tuple[str, ...]) -> str:
    """One header line, then every problem on its own indented line, sorted and de-duplicated."""
    lines = sorted(set(problems))
    return header + "".join(f"\n  - {line}" for line in lines)
