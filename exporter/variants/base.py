"""What every variant shares: the record of a transform, and the judge that scores a candidate.

A variant module (``optimized``, ``fp16``, ``int8``) exposes::

    NAME: str                              "int8"
    TOOL: str                              "onnxruntime.quantization"
    DEFAULT_OPTIONS: Mapping[str, Any]     its options and their defaults
    TOLERANCES: Mapping[str, Tolerance]    elementwise tolerance per dtype ({} = the model's own)
    ELEMENTWISE_DECIDES: bool              False: elementwise errors are reported, the task
                                           metrics alone decide (int8)
    applies(spec, model) -> str | None     None when the variant can be made, else why not
    transform(src, dst, *, calibration, options=None, judge=None) -> VariantInfo

A :class:`Judge` runs a candidate ``.onnx`` in onnxruntime on the sweep's cases and scores
it against the *framework's* outputs (never the float32 ONNX): the task metrics of
:mod:`exporter.metrics`, and a smooth error used to rank candidates while searching.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter import metrics as _metrics
from exporter.errors import RunError, UsageError

__all__ = ["VariantInfo", "Judge", "tool_version", "latency_ms", "check_options", "timing_feed", "probe", "model_bytes"]


@dataclass(frozen=True)
class VariantInfo:
    """What a transform did: the tool, its version and options, and its findings.

    Attributes:
        variant: ``"optimized"``, ``"fp16"`` or ``"int8"``.
        tool: the library that made it (``"onnxruntime.quantization"``).
        tool_version: that library's version.
        options: the options used (defaults filled in).
        details: the transform's findings (fusion counts, fp32 block list, excluded
            nodes, latencies, model bytes), JSON-ready.
        warnings: things the user must know (no Attention fused, guard failed, ...).
    """

    variant: str
    tool: str
    tool_version: str
    options: Mapping[str, Any]
    details: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "tool": self.tool,
            "tool_version": self.tool_version,
            "options": dict(self.options),
            "details": dict(self.details),
            "warnings": list(self.warnings),
        }


def tool_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def check_options(variant: str, defaults: Mapping[str, Any], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``defaults`` updated with ``options``; unknown keys are a UsageError naming the known ones."""
    given = dict(options or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UsageError(
            f"variant {variant!r}: unknown option(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(defaults))}"
        )
    return {**dict(defaults), **given}


_PROBE = """
import sys
import onnxruntime as ort
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.intra_op_num_threads = int(sys.argv[2])
so.log_severity_level = 3
try:
    ort.InferenceSession(sys.argv[1], sess_options=so, providers=["CPUExecutionProvider"])
except Exception as e:
    print(f"{type(e).__name__}: {e}")
    sys.exit(3)
"""


def probe(path: str | os.PathLike[str], *, threads: int = 1, variant: str = "") -> None:
    """Open ``path`` in onnxruntime (CPU, level ``all``) in a child process first.

    A transformed graph can crash onnxruntime itself (measured: onnxruntime 1.32's
    NchwcTransformer segfaults on the fp16 graph of our ``transformer`` torch export);
    in a child the crash is a verdict, not the end of the export.

    Raises:
        RunError: the child died from a signal (the message names it and the level).
    """
    import signal
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, os.fspath(path), str(threads)], capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired as e:
        raise RunError(f"variant {variant!r}: onnxruntime did not finish loading {path} within {e.timeout:.0f} s") from e
    if done.returncode < 0:
        try:
            sig = signal.Signals(-done.returncode).name
        except ValueError:
            sig = f"signal {-done.returncode}"
        import onnxruntime

        raise RunError(
            f"variant {variant!r}: onnxruntime {onnxruntime.__version__} crashes ({sig}) creating a CPU session for "
            f"{path} at graph optimization level 'all'; this model cannot be shipped to onnxruntime as is"
        )


def _session(path: str | os.PathLike[str], threads: int) -> Any:
    from exporter.runtimes.onnxruntime import OnnxRuntime

    return OnnxRuntime(path, intra_op_threads=threads)


def latency_ms(
    paths: Mapping[str, str | os.PathLike[str]], feed: Mapping[str, np.ndarray], *, threads: int = 1, budget_s: float = 0.3
) -> dict[str, float]:
    """Median wall time (ms) of one onnxruntime run of each model on ``feed``, measured interleaved.

    All sessions are opened and warmed up first, then run in turn (a, b, a, b, ...) at
    least 3 times each and until ``budget_s`` is spent (at most 200 rounds), so load
    from other processes hits every model alike and the ratios stay meaningful.
    """
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    try:
        for rt in sessions.values():
            rt.run(feed)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        start = time.perf_counter()
        rounds = 0
        while rounds < 3 or (time.perf_counter() - start < budget_s and rounds < 200):
            for k, rt in sessions.items():
                t = time.perf_counter()
                rt.run(feed)
                times[k].append(time.perf_counter() - t)
            rounds += 1
    finally:
        for rt in sessions.values():
            rt.close()
    return {k: float(np.median(v) * 1e3) for k, v in times.items()}


def timing_feed(feeds: Sequence[Mapping[str, np.ndarray]]) -> Mapping[str, np.ndarray]:
    """The feed latencies are measured on: the median-sized one (the largest of a sweep
    can take seconds per run on a big model; ratios are what is recorded)."""
    assert feeds, "no feeds"
    order = sorted(feeds, key=lambda f: sum(int(np.asarray(v).size) for v in f.values()))
    return order[len(order) // 2]


class Judge:
    """Scores candidate ONNX files against the framework's outputs on a fixed set of cases.

    Args:
        feeds: the inputs of every case (the sweep's, plus user inputs).
        expected: the framework's outputs for each feed (the reference, never an ONNX).
        kinds: output -> kind (:func:`exporter.metrics.output_kinds`).
        thresholds: output -> metric -> threshold (:func:`exporter.metrics.thresholds_for`).
        variant: the variant being judged (recorded in reports).
        threads: onnxruntime intra-op threads.
    """

    def __init__(
        self,
        feeds: Sequence[Mapping[str, np.ndarray]],
        expected: Sequence[Mapping[str, np.ndarray]],
        kinds: Mapping[str, str],
        thresholds: Mapping[str, Mapping[str, float]],
        *,
        variant: str,
        threads: int = 1,
    ) -> None:
        assert len(feeds) == len(expected) and feeds, (len(feeds), len(expected))
        self.feeds = [dict(f) for f in feeds]
        self.expected = [dict(e) for e in expected]
        self.kinds = dict(kinds)
        self.thresholds = {o: dict(t) for o, t in thresholds.items()}
        self.variant = variant
        self.threads = threads
        # Searches rank many candidates: do it on the smallest cases holding about a
        # quarter of the elements (at least one case); verdicts always use every case.
        order = sorted(range(len(self.feeds)), key=lambda i: self._size(i))
        total = sum(self._size(i) for i in order)
        chosen, acc = [], 0
        for i in order:
            if chosen and acc + self._size(i) > total / 4:
                break
            chosen.append(i)
            acc += self._size(i)
        self._rank_cases = sorted(chosen)

    def _size(self, i: int) -> int:
        return sum(int(np.asarray(v).size) for v in self.feeds[i].values())

    def outputs(self, path: str | os.PathLike[str], cases: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
        """The candidate's outputs on each case (all cases by default).

        Raises:
            RunError: onnxruntime cannot load or run the candidate.
        """
        idx = range(len(self.feeds)) if cases is None else cases
        if cases is None:  # a model that is judged (not just ranked): open it in a child first
            probe(path, threads=self.threads, variant=self.variant)
        try:
            rt = _session(path, self.threads)
        except UsageError as e:
            raise RunError(f"variant {self.variant!r}: onnxruntime cannot load {path}: {e}") from e
        try:
            out = []
            for i in idx:
                try:
                    out.append(rt.run(self.feeds[i]))
                except UsageError:
                    raise
                except Exception as e:  # onnxruntime's own failure types
                    raise RunError(f"variant {self.variant!r}: onnxruntime failed to run {path}: {type(e).__name__}: {e}") from e
            return out
        finally:
            rt.close()

    def metrics(self, path: str | os.PathLike[str], outputs: Sequence[Mapping[str, np.ndarray]] | None = None) -> _metrics.MetricReport:
        """The task metrics of ``path`` over every case (``outputs``: already computed ones)."""
        got = self.outputs(path) if outputs is None else outputs
        return _metrics.evaluate(self.expected, got, self.kinds, self.thresholds, variant=self.variant)

    def error(self, path: str | os.PathLike[str]) -> float:
        """A smooth score for ranking (lower is better), on the ranking cases.

        The mean over judged outputs (those with metrics) of ``||c - r|| / ||r||``; a
        non-finite value scores infinity.
        """
        got = self.outputs(path, self._rank_cases)
        judged = [o for o, k in self.kinds.items() if self.thresholds.get(o)]
        errs = []
        for o in judged:
            num = den = 0.0
            for i, g in zip(self._rank_cases, got):
                c = np.asarray(g[o], dtype=np.float64)
                r = np.asarray(self.expected[i][o], dtype=np.float64)
                if not np.isfinite(c).all():
                    return float("inf")
                num += float(((c - r) ** 2).sum())
                den += float((r**2).sum())
            errs.append(np.sqrt(num) / max(np.sqrt(den), 1e-30))
        return float(np.mean(errs)) if errs else 0.0

    def latency_feed(self) -> Mapping[str, np.ndarray]:
        return timing_feed(self.feeds)


def model_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of an ``.onnx`` file plus its external data files beside it, if any."""
    p = Path(path)
    total = p.stat().st_size
    data = p.with_name(p.name + ".data")
    if data.is_file():
        total += data.stat().st_size
    return total
