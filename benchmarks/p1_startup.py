"""P1: ``python -m exporter list`` and ``--help`` wall time vs ``python -c "import torch"``.

Each round runs the anchor and both commands once, in fresh interpreters, interleaved; the
ratio of each round is ours / anchor.  One untimed warm-up round fills the page cache and
the bytecode caches first.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import PY, figure, summary, wall_time

TARGET = 0.25


def run(cfg: Any) -> list[dict[str, Any]]:
    anchor_cmd = [PY, "-c", "import torch"]
    cmds = {"list": [PY, "-m", "exporter", "list"], "help": [PY, "-m", "exporter", "--help"]}
    for cmd in (anchor_cmd, *cmds.values()):  # warm-up
        wall_time(cmd)
    anchor: list[float] = []
    ours: dict[str, list[float]] = {k: [] for k in cmds}
    ratios: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(cfg.repeats(9, 3)):
        a = wall_time(anchor_cmd)
        anchor.append(a)
        for k, cmd in cmds.items():
            t = wall_time(cmd)
            ours[k].append(t)
            ratios[k].append(t / a)
    return [
        figure(
            f"P1.{k}",
            f"`python -m exporter {'list' if k == 'list' else '--help'}` wall time",
            '`python -c "import torch"` wall time',
            ratios[k],
            op="<=",
            target=TARGET,
            ratio_is="ours / anchor (wall time of a fresh process)",
            ours=summary(ours[k]),
            anchor_values=summary(anchor),
        )
        for k in cmds
    ]
