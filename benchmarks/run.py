"""Benchmarks against peers, with targets (issue 6).

    python benchmarks/run.py [--quick] [--only P1,P2] [--out DIR] [--workdir DIR] [--strict]

Each figure is a ratio against its anchor measured in the same run (interleaved, repeated;
median and spread reported):

    P1  `exporter list` / `--help` wall time      vs  python -c "import torch"        <= 0.25x
    P2  ~512 MB safetensors -> torch model         vs  safetensors.torch.load_model    >= 1.0x throughput
        peak RSS                                   vs  model bytes                     <= 1.2x
    P3  export + parity sweep, whole registry      vs  bare torch.onnx/jax2onnx + ort  <= 1.2x
    P4  onnxruntime latency, batch 1 and 32        vs  torch eager, jax.jit            <= 1.0x
    P5  training checkpoint save (fsync) / load    vs  raw write+fsync / raw read      >= 0.8x
        (strict rows: load vs readinto into the same kind of buffer as ours)
    P6  export of a >= 2.5 GB model (external data) peak RSS vs model bytes            <= 2.0x
    P7  export from a 2-rank sharded DCP checkpoint peak RSS vs model bytes           <= 1.3x
    P8  `export minilm --checkpoint` (full sweep)   vs  optimum-cli export onnx (same dir) <= 1.0x
        (skipped, with the install command, when optimum-onnx's own venv is absent)
    P9  second `export --all`, nothing changed     vs  the first `export --all`        <= 0.05x
        `export --all --force --jobs 2`            vs  the same with --jobs 1          <= 0.75x
        peak RSS of the largest --jobs 2 process   vs  the --jobs 1 process            <= 1.1x

Writes ``results.json`` and ``results.md`` (atomically) into ``--out`` (default: this
directory) and prints which targets are met.  ``--quick`` uses small sizes and fewer
repeats (a couple of minutes; for CI).  With ``--only``, the groups not run keep their
previous results in ``results.json``.  Exit status: 0, or 2 when a group failed to run;
with ``--strict`` also 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from exporter import atomic  # noqa: E402

GROUPS: dict[str, str] = {
    "P1": "benchmarks.p1_startup",
    "P2": "benchmarks.p2_load",
    "P3": "benchmarks.p3_export",
    "P4": "benchmarks.p4_latency",
    "P5": "benchmarks.p5_checkpoint",
    "P6": "benchmarks.p6_large_export",
    "P7": "benchmarks.p7_sharded_export",
    "P8": "benchmarks.p8_optimum",
    "P9": "benchmarks.p9_pipeline",
}
TITLES = {
    "P1": "CLI start-up",
    "P2": "load a safetensors state into a torch model",
    "P3": "export + parity sweep of the whole registry",
    "P4": "onnxruntime latency of the exports",
    "P5": "training checkpoint save and load",
    "P6": "export of a >= 2.5 GB model",
    "P7": "export from a sharded DCP checkpoint",
    "P8": "single-model export vs optimum-cli",
    "P9": "release pipeline: incremental re-run, --jobs 2 vs 1",
}
NOISY_LOAD = 1.5
RESULTS_FORMAT = "exporter-benchmarks"


@dataclass
class Config:
    """What every group gets: mode, scratch directory, and a logger."""

    quick: bool
    workdir: Path
    keep: bool = False
    repeat_override: int | None = None
    log_lines: list[str] = field(default_factory=list)

    def repeats(self, full: int, quick: int) -> int:
        if self.repeat_override is not None:
            return self.repeat_override
        return quick if self.quick else full

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        self.log_lines.append(line)
        print(line, file=sys.stderr, flush=True)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer repeats (CI)")
    ap.add_argument("--only", default="", help="comma-separated groups to run, e.g. P1,P2 (default: all)")
    ap.add_argument("--out", type=Path, default=here, help="where results.json / results.md go (default: benchmarks/)")
    ap.add_argument("--workdir", type=Path, default=here / "work", help="scratch space for state files and bundles")
    ap.add_argument("--repeats", type=int, default=None, help="override the number of repeats of every figure")
    ap.add_argument("--keep", action="store_true", help="keep the scratch files (big state files are reused)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    groups = [g.strip().upper() for g in args.only.split(",") if g.strip()] or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    args.groups = groups
    return args


def run_group(gid: str, cfg: Config) -> dict[str, Any]:
    """Run one group; never raises (a failure is recorded in the result)."""
    load_before = common.load_average()
    t = time.perf_counter()
    cfg.log(f"{gid}: {TITLES[gid]} ...")
    result: dict[str, Any] = {
        "group": gid,
        "title": TITLES[gid],
        "quick": cfg.quick,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load_before,
    }
    try:
        got = importlib.import_module(GROUPS[gid]).run(cfg)  # a list of figures, or {"figures", "notes"}
        result["figures"] = got["figures"] if isinstance(got, dict) else got
        result["notes"] = list(got.get("notes", [])) if isinstance(got, dict) else []
        result["skipped"] = got.get("skipped") if isinstance(got, dict) else None
        result["error"] = None
        if result["skipped"]:
            cfg.log(f"{gid}: skipped: {result['skipped']}")
    except Exception as e:  # one group failing must not lose the others
        result["figures"] = []
        result["error"] = f"{type(e).__name__}: {e}"
        cfg.log(f"{gid}: FAILED: {type(e).__name__}: {e}")
        traceback.print_exc()
    result["seconds"] = round(time.perf_counter() - t, 1)
    result["load_average_after"] = common.load_average()
    result["noisy"] = max(load_before[:1] + result["load_average_after"][:1] or [0.0]) > NOISY_LOAD
    for f in result["figures"]:
        r = f["ratio"]
        cfg.log(f"{f['id']}: {r['median']:.3f}x (min {r['min']:.3f}, max {r['max']:.3f}) target {f['target']['op']} {f['target']['value']} -> {'met' if f['met'] else 'MISSED'}")
    return result


def _fmt_ratio(f: dict[str, Any]) -> str:
    r = f["ratio"]
    return f"{r['median']:.3f}"


def _spread(f: dict[str, Any]) -> str:
    r = f["ratio"]
    return f"{r['min']:.3f} .. {r['max']:.3f} (IQR {r['q1']:.3f} .. {r['q3']:.3f}, n={r['n']})"


def markdown(doc: dict[str, Any]) -> str:
    """The results as a markdown table plus per-group notes."""
    m = doc["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `python benchmarks/run.py{' --quick' if doc.get('quick') else ''}`; written {doc['written']}.",
        f"Machine: {m['cores']} cores ({m['cpu']}), {round((m['mem_total_bytes'] or 0) / 2**30, 1)} GiB RAM, {m['platform']}.",
        "Every figure is a ratio against its anchor measured in the same run (interleaved repeats); "
        "the verdict uses the median.",
        "",
        "| id | measure | anchor | ratio (median) | spread: min .. max (IQR) | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for g in doc["groups"].values():
        for f in g["figures"]:
            lines.append(
                f"| {f['id']} | {f['measure']} | {f['anchor']} | {_fmt_ratio(f)} | {_spread(f)} | "
                f"{f['target']['op']} {f['target']['value']} | {'yes' if f['met'] else '**no**'} |"
            )
        if g.get("error"):
            lines.append(f"| {g['group']} | {g['title']} | | | | | **error** |")
        if g.get("skipped"):
            lines.append(f"| {g['group']} | {g['title']} | | | | | skipped |")
    lines.append("")
    for gid, g in doc["groups"].items():
        load = f"load average before {g['load_average_before']}, after {g['load_average_after']}"
        noisy = " **Noisy: the machine was loaded (1-min load > 1.5 on 2 cores).**" if g.get("noisy") else ""
        notes.append(f"- **{gid}** ({g['title']}; {'quick' if g['quick'] else 'full'} mode, {g['seconds']} s, {g['started']}; {load}).{noisy}")
        if g.get("error"):
            notes.append(f"  - error: `{g['error']}`")
        notes += [f"  - {n}" for n in g.get("notes", [])]
        for f in g["figures"]:
            bits = [f"ratio = {f['ratio_is']}"]
            if f.get("notes"):
                bits.append(f["notes"])
            if f.get("ours"):
                bits.append(f"ours median {_num(f['ours']['median'], f['unit'])}")
            if f.get("anchor_values"):
                bits.append(f"anchor median {_num(f['anchor_values']['median'], f['unit'])}")
            notes.append(f"  - {f['id']}: " + "; ".join(bits))
    v = doc["versions"]
    return "\n".join(
        lines
        + ["## Notes", ""]
        + notes
        + ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val), ""]
    )


def _num(x: float, unit: str) -> str:
    if unit == "bytes":
        return f"{x / 2**20:.1f} MiB"
    if unit == "s":
        return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"
    return f"{x:g} {unit}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    # --keep: a fixed scratch directory whose big state files later runs reuse; otherwise a
    # directory of this run only, removed at the end (nothing else under --workdir is touched).
    scratch = args.workdir.resolve() / ("cache" if args.keep else f"run-{os.getpid()}")
    cfg = Config(quick=args.quick, workdir=scratch, keep=args.keep, repeat_override=args.repeats)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    results_json = out / "results.json"
    previous: dict[str, Any] = {}
    if set(args.groups) != set(GROUPS) and results_json.is_file():
        try:
            previous = json.loads(results_json.read_text()).get("groups", {})
        except (OSError, ValueError):
            previous = {}
    load_start = common.load_average()
    if load_start and load_start[0] > NOISY_LOAD:
        cfg.log(f"load average {load_start} > {NOISY_LOAD}: the numbers will be noisy")
    groups = dict(previous)
    for gid in args.groups:
        groups[gid] = run_group(gid, cfg)
    doc = {
        "format": RESULTS_FORMAT,
        "format_version": 1,
        "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "command": " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": common.machine(),
        "load_average_start": load_start,
        "load_average_end": common.load_average(),
        "noisy": bool(load_start and load_start[0] > NOISY_LOAD) or any(g.get("noisy") for g in groups.values()),
        "versions": common.versions(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS") if k in os.environ},
        "groups": {gid: groups[gid] for gid in GROUPS if gid in groups},
        "summary": {},
    }
    for g in doc["groups"].values():
        for f in g["figures"]:
            doc["summary"][f["id"]] = {"median": f["ratio"]["median"], "target": f"{f['target']['op']} {f['target']['value']}", "met": f["met"]}
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(results_json, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic.write_text(out / "results.md", markdown(doc))
    if not cfg.keep:
        shutil.rmtree(cfg.workdir, ignore_errors=True)

    ran = [doc["groups"][g] for g in args.groups]
    figs = [f for g in ran for f in g["figures"]]
    met = [f["id"] for f in figs if f["met"]]
    missed = [f["id"] for f in figs if not f["met"]]
    failed = [g["group"] for g in ran if g.get("error")]
    print(f"targets met: {', '.join(met) or '(none)'}")
    print(f"targets missed: {', '.join(missed) or '(none)'}")
    if failed:
        print(f"groups that failed to run: {', '.join(failed)}")
    print(f"results: {results_json} and {out / 'results.md'}")
    if failed:
        return 2
    return 1 if (args.strict and missed) else 0



if __name__ == "__main__":
    raise SystemExit(main())
