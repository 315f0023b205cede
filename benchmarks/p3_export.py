"""P3: export + parity sweep of the whole registry, both frameworks, vs the bare peer pipeline.

Ours: ``python -m exporter export --all --out DIR`` (the README's first command): for
every registry model and both frameworks, seeded state saved and re-read, rebuilt,
exported, parity sweep of onnxruntime against the framework (batch 1, 2, 7, 64, crossed
with the sizes of the model's other dynamic dims that the bundle sweeps, e.g. seq), and
a complete bundle (test data, reports, manifest, all fsynced).

Anchor: a script that does only the peers' part for the same models
(``benchmarks.child.p3_anchor``): ``torch.onnx.export(dynamo=True)``, ``jax2onnx.to_onnx``,
and onnxruntime runs on the same cases (read from our bundles' manifests).

Both are timed as whole fresh processes (interpreter start and imports included),
interleaved; ratio = ours / anchor.  The per-stage seconds that our bundles record in
their manifests are kept to show where the difference goes.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from benchmarks.common import PY, figure, summary, wall_time

TARGET = 1.2


def _manifests(out: Any) -> list[dict[str, Any]]:
    return [json.loads(m.read_text()) for m in sorted(out.glob("*/*/manifest.json"))]


def _stages(out: Any) -> dict[str, dict[str, float]]:
    return {f"{m['model']}/{m['framework']}": m.get("seconds", {}) for m in _manifests(out)}


def _cases(out: Any) -> dict[str, dict[str, list[dict[str, int]]]]:
    """model -> framework -> the dims of every case our sweep ran (from the manifests)."""
    cases: dict[str, dict[str, list[dict[str, int]]]] = {}
    for m in _manifests(out):
        dims = [dict(s["dims"]) for s in m.get("test_data_sets", []) if s.get("dims")]
        cases.setdefault(m["model"], {})[m["framework"]] = dims
    return cases


def run(cfg: Any) -> list[dict[str, Any]]:
    models = ["mlp"] if cfg.quick else None
    ours_cmd_models = ["mlp"] if cfg.quick else ["--all"]
    out = cfg.workdir / "p3_ours"
    anchor_dir = cfg.workdir / "p3_anchor"
    ours_cmd = [PY, "-m", "exporter", "export", *ours_cmd_models, "--framework", "all", "--out", str(out)]
    ours, anchor = [], []
    stages: list[dict[str, dict[str, float]]] = []
    cases: dict[str, Any] = {}

    def run_ours(i: int) -> None:
        nonlocal cases
        shutil.rmtree(out, ignore_errors=True)
        ours.append(wall_time(ours_cmd, timeout=1800))
        cfg.log(f"P3: round {i + 1}: ours {ours[-1]:.1f} s")
        stages.append(_stages(out))
        cases = cases or _cases(out)

    def run_anchor(i: int) -> None:
        shutil.rmtree(anchor_dir, ignore_errors=True)
        params = {"dir": str(anchor_dir), "models": models, "cases": cases}
        anchor.append(wall_time([PY, "-m", "benchmarks.child", "p3_anchor", json.dumps(params)], timeout=1800))
        cfg.log(f"P3: round {i + 1}: anchor {anchor[-1]:.1f} s")

    for i in range(cfg.repeats(3, 1)):
        # ours first in the first round: the anchor runs onnxruntime on the cases our sweep ran
        for step in (run_ours, run_anchor) if i % 2 == 0 else (run_anchor, run_ours):
            step(i)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(anchor_dir, ignore_errors=True)
    what = "mlp only (quick)" if cfg.quick else "every registry model"
    return [
        figure(
            "P3",
            f"`python -m exporter export {' '.join(ours_cmd_models)} --framework all` ({what}: state, rebuild, export, parity sweep, bundle)",
            "bare torch.onnx.export(dynamo) + jax2onnx.to_onnx + onnxruntime runs on the same cases",
            [o / a for o, a in zip(ours, anchor)],
            op="<=",
            target=TARGET,
            ratio_is="ours / anchor (wall time of a fresh process, imports included)",
            ours=summary(ours),
            anchor_values=summary(anchor),
            notes=f"{what}; the anchor runs onnxruntime on the same cases as our sweep "
            f"({sum(len(c) for fw in cases.values() for c in fw.values())} runs); stage seconds of our bundles in extra.stages (last round)",
            extra={"stages": stages[-1] if stages else {}, "cases": cases},
        )
    ]
