"""P9: release-pipeline speed: an incremental re-run, and ``--jobs 2`` against ``--jobs 1``.

Each figure compares two runs of the same command line in the same benchmark run:

- **P9.incremental**: ``export --all`` into a directory that the same command filled a
  moment before (nothing changed: every bundle is checked (record + every file's sha256)
  and reported up to date), over the first ``export --all`` into an empty directory.
  Target <= 0.05.
- **P9.jobs**: ``export --all --force --jobs 2`` over ``export --all --force --jobs 1``
  (both rebuild every bundle), interleaved.  Target <= 0.75 on 2 cores.
- **P9.jobs_rss**: the peak RSS of the largest process of the ``--jobs 2`` run (the
  parent or one worker) over the peak RSS of the ``--jobs 1`` process: memory per job
  stays that of a serial run (target <= 1.1).

Every run is a fresh process (``benchmarks.child peak_rss_of`` runs it and reports the
largest RSS in its process tree, from ``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import shutil
from typing import Any

from benchmarks.common import PY, figure, run_case, summary

TARGET_INCREMENTAL = 0.05
TARGET_JOBS = 0.75
TARGET_JOBS_RSS = 1.1


def run(cfg: Any) -> list[dict[str, Any]]:
    models = ["mlp", "cnn", "transformer"] if cfg.quick else ["--all"]
    what = "mlp, cnn, transformer (quick)" if cfg.quick else "every registry model, both frameworks"

    def export(out: Any, *extra: str) -> dict[str, Any]:
        cmd = [PY, "-m", "exporter", "export", *models, "--framework", "all", "--out", str(out), *extra]
        return run_case("peak_rss_of", {"cmd": cmd}, timeout=3600)

    first, again, serial, parallel = [], [], [], []
    for i in range(cfg.repeats(2, 1)):
        out = cfg.workdir / "p9_inc"
        shutil.rmtree(out, ignore_errors=True)
        first.append(export(out))
        again.append(export(out))
        cfg.log(f"P9: round {i + 1}: first {first[-1]['seconds']:.1f} s, again {again[-1]['seconds']:.2f} s")
        shutil.rmtree(out, ignore_errors=True)
        jobs_out = cfg.workdir / "p9_jobs"
        shutil.rmtree(jobs_out, ignore_errors=True)
        export(jobs_out)  # fill it once: both timed runs below rebuild every bundle (--force) in the same state
        for jobs in ((1, 2) if i % 2 == 0 else (2, 1)):
            got = export(jobs_out, "--force", "--jobs", str(jobs))
            (serial if jobs == 1 else parallel).append(got)
            cfg.log(f"P9: round {i + 1}: --jobs {jobs} {got['seconds']:.1f} s, peak RSS {got['peak_rss'] / 2**20:.0f} MiB")
        shutil.rmtree(jobs_out, ignore_errors=True)
    sec = lambda runs: [r["seconds"] for r in runs]  # noqa: E731
    rss = lambda runs: [r["peak_rss"] / 2**20 for r in runs]  # noqa: E731
    return [
        figure(
            "P9.incremental",
            f"second `export {' '.join(models)}` with nothing changed ({what}: every bundle checked, none rebuilt)",
            "the first `export` into an empty directory",
            [a / f for a, f in zip(sec(again), sec(first))],
            op="<=", target=TARGET_INCREMENTAL, ratio_is="second run / first run (wall time of a fresh process)",
            ours=summary(sec(again)), anchor_values=summary(sec(first)), notes=what,
        ),
        figure(
            "P9.jobs",
            f"`export {' '.join(models)} --force --jobs 2` ({what})",
            "the same with `--jobs 1`",
            [p / s for p, s in zip(sec(parallel), sec(serial))],
            op="<=", target=TARGET_JOBS, ratio_is="--jobs 2 / --jobs 1 (wall time of a fresh process)",
            ours=summary(sec(parallel)), anchor_values=summary(sec(serial)), notes=f"{what}; 2 worker processes on the machine's cores",
        ),
        figure(
            "P9.jobs_rss",
            "peak RSS of the largest process of the `--jobs 2` run (parent or a worker)",
            "peak RSS of the `--jobs 1` process",
            [p / s for p, s in zip(rss(parallel), rss(serial))],
            op="<=", target=TARGET_JOBS_RSS, ratio_is="peak RSS, --jobs 2's largest process / --jobs 1", unit="MiB",
            ours=summary(rss(parallel)), anchor_values=summary(rss(serial)),
            notes="memory per job: each worker holds one model at a time (and at most both frameworks)",
        ),
    ]  # fmt: skip
