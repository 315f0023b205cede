"""Helpers for users' own CI tests: one call, a readable AssertionError listing every failure.

    from exporter.testing import assert_parity, assert_verified

    def test_my_model_exports(tmp_path):
        assert_parity("my_model", checkpoint="weights.safetensors", out=tmp_path)

    def test_shipped_bundle():
        assert_verified("release/my_model/torch")
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

__all__ = ["assert_parity", "assert_verified"]


def assert_parity(
    model: str | Sequence[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    framework: str = "all",
    out: str | os.PathLike[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    inputs: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Export ``model`` and assert that every bundle passes its parity sweep.

    Args:
        model: registry name(s).
        checkpoint, framework, batch_sizes, atol, rtol, inputs, **kwargs: as ``exporter.export``.
        out: where to write the bundles (default: a temporary directory, removed afterwards).

    Returns:
        The ``ExportReport`` (when it passes).

    Raises:
        AssertionError: any output out of tolerance at any case, or a bundle that could not
            be exported; the message lists each failure on its own line.
    """
    from exporter.api import export

    def run(dest: str | os.PathLike[str]) -> Any:
        report = export(
            model, checkpoint=checkpoint, framework=framework, out=dest, batch_sizes=batch_sizes,
            atol=atol, rtol=rtol, inputs=inputs, **kwargs,
        )  # fmt: skip
        if not report.ok:
            lines = report.failures() or ["nothing was exported"]
            raise AssertionError(f"parity failed for {model!r} ({report.summary()}):\n" + "\n".join(f"  - {x}" for x in lines))
        return report

    if out is not None:
        return run(out)
    with tempfile.TemporaryDirectory(prefix="exporter-parity-") as tmp:
        return run(tmp)


def assert_verified(bundle: str | os.PathLike[str], runtime: str = "onnxruntime", **kwargs: Any) -> Any:
    """Assert that a bundle's test data still passes in ``runtime`` (``exporter.verify``).

    Returns:
        The ``ParityReport`` (when it passes).

    Raises:
        AssertionError: listing every failing output and case.
    """
    from exporter.api import verify

    report = verify(bundle, runtime, **kwargs)
    if not report.ok:
        raise AssertionError(f"verification failed for {os.fspath(bundle)!r} ({report.summary()}):\n" + "\n".join(f"  - {x}" for x in report.failures()))
    return report
