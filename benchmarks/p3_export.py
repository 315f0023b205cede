"""P3: export + parity sweep of the whole registry, both frameworks, vs the bare peer pipeline.

Ours: ``python -m exporter export --all --out DIR`` (the README's first command): for
every registry model and both frameworks, seeded state saved and re-read, rebuilt,
exported, parity sweep (batch 1, 2, 7, 64) of onnxruntime against the framework, and a
complete bundle (test data, reports, manifest, all fsynced).

Anchor: a script that does only the peers' part for the same models
(``benchmarks.child.p3_anchor``): ``torch.onnx.export(dynamo=True)``, ``jax2onnx.to_onnx``,
and onnxruntime runs at the same batch sizes.

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


def _stages(out: Any) -> dict[str, dict[str, float]]:
    stages: dict[str, dict[str, float]] = {}
    for manifest in sorted(out.glob("*/*/manifest.json")):
        m = json.loads(manifest.read_text())
        stages[f"{m['model']}/{m['framework']}"] = m.get("seconds", {})
    return stages


def run(cfg: Any) -> list[dict[str, Any]]:
    models = ["mlp"] if cfg.quick else None
    ours_cmd_models = ["mlp"] if cfg.quick else ["--all"]
    out = cfg.workdir / "p3_ours"
    anchor_dir = cfg.workdir / "p3_anchor"
    ours_cmd = [PY, "-m", "exporter", "export", *ours_cmd_models, "--framework", "all", "--out", str(out)]
    anchor_cmd = [PY, "-m", "benchmarks.child", "p3_anchor", json.dumps({"dir": str(anchor_dir), "models": models})]
    ours, anchor = [], []
    stages: list[dict[str, dict[str, float]]] = []
    for i in range(cfg.repeats(3, 1)):
        for d in (out, anchor_dir):
            shutil.rmtree(d, ignore_errors=True)
        anchor.append(wall_time(anchor_cmd, timeout=1800))
        cfg.log(f"P3: round {i + 1}: anchor {anchor[-1]:.1f} s")
        ours.append(wall_time(ours_cmd, timeout=1800))
        cfg.log(f"P3: round {i + 1}: ours {ours[-1]:.1f} s")
        stages.append(_stages(out))
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(anchor_dir, ignore_errors=True)
    what = "mlp only (quick)" if cfg.quick else "every registry model"
    return [
        figure(
            "P3",
            f"`python -m exporter export {' '.join(ours_cmd_models)} --framework all` ({what}: state, rebuild, export, parity sweep 1/2/7/64, bundle)",
            "bare torch.onnx.export(dynamo) + jax2onnx.to_onnx + onnxruntime runs at the same batch sizes",
            [o / a for o, a in zip(ours, anchor)],
            op="<=",
            target=TARGET,
            ratio_is="ours / anchor (wall time of a fresh process, imports included)",
            ours=summary(ours),
            anchor_values=summary(anchor),
            notes=f"{what}; stage seconds of our bundles in extra.stages (last round)",
            extra={"stages": stages[-1] if stages else {}},
        )
    ]
