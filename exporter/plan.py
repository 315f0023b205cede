"""What one ``export`` call will do, validated once: an :class:`ExportPlan` per model, and
the :class:`StateSource` its bundles are rebuilt from.

``exporter.api.export`` builds the plans (every problem in the request is collected before
any heavy work starts) and reads each model's state once; ``exporter.bundle.build`` trusts
both and re-validates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec, Tolerance
    from exporter.parity import Run

__all__ = ["ExportPlan", "StateSource"]


@dataclass(frozen=True)
class ExportPlan:
    """One model's exports: which builds, which sweep, which options.

    Attributes:
        spec: the registry entry.
        frameworks: the builds to export, in order (``"torch"``, ``"flax"``).
        cases: the swept dims, one ``{dim: size}`` per case (``parity.sweep_cases``).
        runs: every case with its seeded inputs, then the user's inputs (loaded once) as
            one more case (``parity.plan_runs``); shared by every framework.
        tolerance: ``(output, dtype) -> Tolerance``, overrides applied (``parity.tolerance_for``).
        atol, rtol: the overrides as given (recorded in the manifest).
        opset: ONNX opset.
        seed: seed of the seeded state and of the sweep's inputs.
        external_data: force (True) / forbid (False) ``model.onnx.data``; None = by size.
        intra_op_threads: onnxruntime threads (None = its default).
        out: output root; bundles go to ``out/<model>/<framework>``.
        checkpoint: the saved state to export (None: a seeded state).
        rename: ``(regex, replacement)`` rules applied to the checkpoint's keys.
        config: a model family's config record (``exporter.models.family``: family,
            source, sha256, values), written to the manifest; None for other models.
        variants: variants to make of each bundle (``exporter.variants``: "optimized",
            "fp16", "int8"), each its own bundle ``out/<model>/<framework>-<variant>``.
        variant_options: variant -> its options (``exporter.variants.<name>.DEFAULT_OPTIONS``).
    """

    spec: ModelSpec
    frameworks: tuple[str, ...]
    cases: tuple[dict[str, int], ...]
    runs: tuple[Run, ...]
    tolerance: Callable[[str, str], Tolerance]
    atol: float | None
    rtol: float | None
    opset: int
    seed: int
    external_data: bool | None
    intra_op_threads: int | None
    out: Path
    checkpoint: Path | None = None
    rename: tuple[tuple[str, str], ...] = ()
    config: Mapping[str, Any] | None = None
    variants: tuple[str, ...] = ()
    variant_options: Mapping[str, Mapping[str, Any]] | None = None

    def bundle_dir(self, framework: str) -> Path:
        """``out/<model>/<framework>``."""
        return self.out / self.spec.name / framework

    @property
    def batch_sizes(self) -> list[int]:
        """The swept batch sizes, sorted."""
        return sorted({c["batch"] for c in self.cases})


class StateSource:
    """The canonical state every bundle of one model is rebuilt from.

    Read, hashed and strictly checked once (``api.export``).  A bundle build that is the
    last user calls :meth:`release` once its framework has run, so that onnxruntime's copy
    of the weights is not held beside this one.

    Attributes:
        provenance: ``{"path", "format", "sha256", "seeded"[, "seed"]}`` recorded in each
            bundle (manifest ``checkpoint``, ``metadata_props``).
        state_file: the seeded ``state.safetensors`` to place in each bundle (same bytes in
            every bundle of the model); None when exporting a user's checkpoint.
        seconds: time spent reading and checking the state.
    """

    __slots__ = ("_canonical", "provenance", "state_file", "seconds")

    def __init__(
        self,
        canonical: dict[str, np.ndarray],
        provenance: Mapping[str, Any],
        *,
        state_file: Path | None = None,
        seconds: float = 0.0,
    ) -> None:
        self._canonical: dict[str, np.ndarray] | None = canonical
        self.provenance = dict(provenance)
        self.state_file = state_file
        self.seconds = seconds

    @property
    def canonical(self) -> dict[str, np.ndarray]:
        """The canonical state (torch-style names, checked against the model)."""
        assert self._canonical is not None, "the state was released by the last bundle that used it"
        return self._canonical

    def release(self) -> None:
        """Drop this source's reference to the arrays (the caller has no further use for them)."""
        self._canonical = None
