"""Shared test fixtures.  Everything a test writes goes under tmp_path / tmp_path_factory."""
from __future__ import annotations

import os

# Keep the suite predictable on 2-core CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def skip_unless_ci(reason: str) -> None:
    """Skip a test whose optional dependency is missing -- except under CI (``CI=true``),
    where the README's test command installs everything and the core path must not be
    skipped: there a missing dependency is a failure."""
    import pytest

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: this path must run in CI; the README's test command installs it)")
    pytest.skip(reason)


# --- helper E (export/bundle/CLI/API tests): every registry model exported once per session.
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``exporter.export(all_models=True, framework="all")`` into a session temp dir.

    Returns the ExportReport; bundles are at ``report.out / <model> / <framework>``.
    Tests must not modify these bundles (copy one first).
    """
    import exporter

    out = tmp_path_factory.mktemp("bundles")
    return exporter.export(all_models=True, framework="all", out=out, intra_op_threads=1)
