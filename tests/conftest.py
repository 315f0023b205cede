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


#: Registry models whose per-model tests take seconds each: in parametrisations they carry the
#: ``slow`` mark (CI runs them; the fast loop keeps the small models of every test).
HEAVY_MODELS = frozenset({"bert", "gpt2", "minilm", "resnet"})


def by_model(values: list[Any], model_of: Callable[[Any], str] = lambda v: v, ids: Callable[[Any], str] | None = None) -> list[Any]:
    """``values`` as pytest params, marked ``slow`` where ``model_of(value)`` is a heavy model."""
    return [
        pytest.param(v, marks=[pytest.mark.slow] if model_of(v) in HEAVY_MODELS else [], id=ids(v) if ids else None)
        if not isinstance(v, tuple)
        else pytest.param(*v, marks=[pytest.mark.slow] if model_of(v) in HEAVY_MODELS else [], id=ids(v) if ids else None)
        for v in values
    ]


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temp directory shared by every xdist worker of this run (the session's own without xdist)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def shared_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> tuple[Path, Any]:
    """Run ``build(directory)`` once per test run, for every xdist worker together.

    The first worker to get here builds into ``<run temp>/<name>`` under a file lock and
    records ``build``'s JSON-able result; the others wait for the lock and read it back.
    Without xdist it simply builds.  Returns ``(directory, result)``.  Consumers must not
    modify what is in the directory (copy it first).
    """
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
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

    Each model is exported under its own lock (:func:`shared_once`); the workers walk the
    registry from opposite ends, so two workers build it in parallel and meet in the
    middle.  Returns the ExportReport (read back from JSON where another worker built a
    model); bundles are at ``report.out / <model> / <framework>``.  Tests must not modify
    these bundles (copy one first).
    """
    import exporter
    from exporter.api import ExportReport
    from exporter.models import registry

    names = registry.names()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    order = names[::-1] if int(worker.removeprefix("gw") or 0) % 2 else names
    out = shared_root(tmp_path_factory) / "bundles"
    reports: dict[str, dict[str, Any]] = {}
    for name in order:

        def build(_: Path, name: str = name) -> dict[str, Any]:
            return exporter.export(name, framework="all", out=out, intra_op_threads=1).to_dict()

        _, reports[name] = shared_once(tmp_path_factory, f"bundles-{name}", build)
    merged = {
        "out": str(out),
        "results": [r for n in names for r in reports[n]["results"]],
        "errors": [e for n in names for e in reports[n]["errors"]],
    }
    return ExportReport.from_dict(merged)
