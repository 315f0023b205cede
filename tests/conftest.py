"""Shared test fixtures.  Everything a test writes goes under tmp_path / tmp_path_factory."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Keep the suite predictable on 2-core CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def skip_unless_ci(reason: str) -> None:
    """Skip a test whose optional dependency is missing -- except under CI (``CI=true``),
    where the README's test command installs everything and the core path must not be
    skipped: there a missing dependency is a failure."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: this path must run in CI; the README's test command installs it)")
    pytest.skip(reason)


def shared_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> tuple[Path, Any]:
    """Run ``build(directory)`` once per test run, for every xdist worker together.

    The first worker to get here builds into ``<run temp>/<name>`` under a file lock and
    records ``build``'s JSON-able result; the others wait for the lock and read it back.
    Without xdist it simply builds.  Returns ``(directory, result)``.  Consumers must not
    modify what is in the directory (copy it first).
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by every worker of this run
    directory = root / name
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            result = build(directory)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(result), encoding="utf-8")
            tmp.replace(done)
    return directory, json.loads(done.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``exporter.export(all_models=True, framework="all")``, built once for all workers.

    Returns the ExportReport (read back from its JSON on workers that did not build it);
    bundles are at ``report.out / <model> / <framework>``.  Tests must not modify these
    bundles (copy one first).
    """
    import exporter
    from exporter.api import ExportReport

    def build(out: Path) -> dict[str, Any]:
        return exporter.export(all_models=True, framework="all", out=out, intra_op_threads=1).to_dict()

    _, report = shared_once(tmp_path_factory, "bundles", build)
    return ExportReport.from_dict(report)
