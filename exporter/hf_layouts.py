"""Layout rules for Hugging Face layouts that ``exporter.layouts`` does not cover.

    rule     torch (canonical)                   flax
    Conv1D   weight (in, out), bias (out,)       Dense kernel (in, out), bias (out,)

GPT-2 (and GPT-2-derived models) compute their projections with ``transformers``'
``Conv1D``: ``y = x @ weight + bias`` with ``weight`` stored ``(in, out)``, the transpose of
``nn.Linear``.  That is already flax ``Dense``'s kernel layout, so the rule maps both
tensors as they are (no transpose), where :class:`exporter.layouts.Dense` would transpose.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.layouts import Rule

__all__ = ["Conv1D"]


@dataclass(frozen=True)
class Conv1D(Rule):
    """HF ``Conv1D`` ``weight`` (in, out) <-> flax ``Dense.kernel`` (in, out); bias as is."""

    bias: bool = True

    def problems(self) -> list[str]:
        out = super().problems()
        if not isinstance(self.bias, bool):
            out.append(f"bias must be True or False, got {self.bias!r}")
        return out

    def pairs(self) -> list[tuple[str, str, str]]:
        base = f"{self.torch}." if self.torch else ""
        flax = "/".join(p for p in ("params", self.flax) if p)
        out = [(f"{base}weight", f"{flax}/kernel", "same")]
        if self.bias:
            out.append((f"{base}bias", f"{flax}/bias", "same"))
        return out
