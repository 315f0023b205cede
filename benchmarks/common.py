"""Shared pieces of the benchmark runner: statistics, subprocess cases, peak RSS, machine facts.

Every figure is a *ratio* of our measurement to an anchor measured in the same run, with
the two interleaved (anchor, ours, anchor, ours, ...) so that a burst of load from other
processes hits both.  A figure holds the per-repeat ratios and their median and spread.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

#: Packages whose versions go into results.json.
VERSION_PACKAGES = (
    "exporter",
    "torch",
    "jax",
    "jaxlib",
    "flax",
    "jax2onnx",
    "onnx",
    "onnx-ir",
    "onnxscript",
    "onnxruntime",
    "safetensors",
    "numpy",
    "optax",
)


class BenchmarkError(RuntimeError):
    """A benchmark case could not run (the message says which and why)."""


# ----------------------------------------------------------------------------- statistics
def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median and spread (min, max, interquartile range) of repeated measurements."""
    vals = sorted(float(v) for v in values)
    assert vals, "no measurements"
    if len(vals) >= 4:
        q1, _q2, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1, q3 = vals[0], vals[-1]
    return {
        "median": statistics.median(vals),
        "min": vals[0],
        "max": vals[-1],
        "q1": q1,
        "q3": q3,
        "n": len(vals),
        "values": [round(v, 6) for v in values],
    }


def figure(
    fid: str,
    measure: str,
    anchor: str,
    ratios: Sequence[float],
    *,
    op: str,
    target: float,
    ratio_is: str,
    ours: Mapping[str, Any] | None = None,
    anchor_values: Mapping[str, Any] | None = None,
    unit: str = "s",
    notes: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One figure: the ratio's median and spread, the target and whether the median meets it.

    Args:
        fid: e.g. ``"P2.throughput"``.
        measure: what was measured (ours).
        anchor: what it is compared with.
        ratios: one ratio per repeat.
        op: ``"<="`` or ``">="``.
        target: the target ratio.
        ratio_is: how the ratio is formed, e.g. ``"ours / anchor (wall time)"``.
        ours, anchor_values: raw measurements (``summary`` dicts).
        unit: unit of the raw measurements.
        notes: caveats.
        extra: anything else worth keeping.
    """
    assert op in ("<=", ">="), op
    s = summary(ratios)
    met = s["median"] <= target if op == "<=" else s["median"] >= target
    return {
        "id": fid,
        "measure": measure,
        "anchor": anchor,
        "ratio_is": ratio_is,
        "ratio": s,
        "target": {"op": op, "value": target},
        "met": bool(met),
        "unit": unit,
        "ours": dict(ours) if ours else None,
        "anchor_values": dict(anchor_values) if anchor_values else None,
        "notes": notes,
        **({"extra": dict(extra)} if extra else {}),
    }


# ----------------------------------------------------------------------------- subprocesses
def child_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a child process: ours plus ``extra`` (a None value removes the variable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def wall_time(cmd: Sequence[str], *, timeout: float = 300, env: Mapping[str, str | None] | None = None) -> float:
    """Wall time of one process run to completion (stdout/stderr discarded); raises if it fails."""
    t = time.perf_counter()
    proc = subprocess.run(
        list(cmd), cwd=REPO, env=child_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout
    )
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise BenchmarkError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
    return dt


def run_case(case: str, params: Mapping[str, Any] | None = None, *, timeout: float = 1800, env: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """Run ``benchmarks.child <case>`` in a fresh interpreter; return the JSON it prints last.

    Raises:
        BenchmarkError: the child failed or printed no result.
    """
    cmd = [PY, "-m", "benchmarks.child", case, json.dumps(dict(params or {}))]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(env), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchmarkError(f"case {case} {dict(params or {})} timed out after {timeout:.0f} s") from e
    out = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not out or not out[-1].startswith("{"):
        tail = proc.stderr.decode(errors="replace")[-3000:]
        raise BenchmarkError(f"case {case} {dict(params or {})} exited {proc.returncode}:\n{tail}")
    return json.loads(out[-1])


# ----------------------------------------------------------------------------- peak RSS (in a child)
class PeakRSS:
    """Peak resident set size of this process over a measured section.

    ``start()`` resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and
    records the current RSS (the baseline: this process after importing the libraries the
    case needs); ``stop()`` reads the high-water mark.  Where the reset is not allowed, it
    falls back to ``getrusage(RUSAGE_SELF).ru_maxrss`` minus the RSS at ``start()``,
    which can only over-estimate.
    """

    def __init__(self) -> None:
        self.method = "VmHWM after clear_refs reset"
        self.baseline = 0
        self.peak = 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise BenchmarkError(f"/proc/self/status has no {field}")

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.method = "ru_maxrss (no clear_refs reset; may over-estimate)"
        self.baseline = self._status("VmRSS")

    def stop(self) -> None:
        if self.method.startswith("VmHWM"):
            self.peak = self._status("VmHWM")
        else:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def to_dict(self) -> dict[str, Any]:
        return {
            "rss_baseline_bytes": self.baseline,
            "rss_peak_bytes": self.peak,
            "rss_delta_bytes": max(self.peak - self.baseline, 0),
            "rss_method": self.method,
        }


# ----------------------------------------------------------------------------- page cache
def evict(path: str | os.PathLike[str]) -> None:
    """Drop a file's (or a directory's files') clean pages from the page cache (best effort)."""
    p = Path(path)
    files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(path: str | os.PathLike[str]) -> None:
    """Read a file (or a directory's files) once so that it sits in the page cache."""
    p = Path(path)
    files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
    buf = bytearray(1 << 24)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


# ----------------------------------------------------------------------------- machine
def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor()


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "mem_total_bytes": mem_total_bytes(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def interleave(n: int, steps: Sequence[Callable[[], Any]]) -> list[list[Any]]:
    """Run ``steps`` round-robin ``n`` times; result[i] holds step i's ``n`` results."""
    out: list[list[Any]] = [[] for _ in steps]
    for _ in range(n):
        for i, step in enumerate(steps):
            out[i].append(step())
    return out
