"""P7: export from a sharded torch.distributed.checkpoint (2 ranks); peak RSS vs model bytes.

The model is P6's wide MLP (``benchmarks.wide``: 10 x Linear(8192, 8192), 2.5 GiB of
float32 weights; quick mode 4 x 2048).  Two gloo ranks (started by
``exporter.distributed.launch``) each hold the row half of every tensor as a DTensor
(``Shard(0)``, FSDP's layout) and save it with ``dcp.save``, in both layouts exporter reads:

* ``P7.dcp``: the default ``FileSystemWriter`` (``__0_0.distcp``, ``__1_0.distcp`` and a
  pickled ``.metadata``): a checkpoint written outside exporter;
* ``P7.shards``: ``HuggingFaceStorageWriter(save_distributed=True)``, one safetensors file per
  rank: the ``dcp/`` directory of exporter's own sharded training steps.

One fresh process then runs P6's measured export (``benchmarks.child.p6_export``) with the
DCP directory as the checkpoint: sniff, consolidate the shards (``exporter.sharded.read_dcp``:
arrays allocated once, filled by ``dcp.load`` a batch at a time), rebuild,
``torch.onnx.export`` with external data, the parity sweep and the bundle.  The figure is the
increase of that process's peak RSS over its post-import baseline, divided by the bytes of
the weights; the baseline's warm-up export reads safetensors, so the figure also counts
loading torch.distributed.checkpoint's code (a few MiB: it can only over-estimate).

Register it in ``benchmarks/run.py``: ``GROUPS["P7"] = "benchmarks.p7_sharded_export"`` and
``TITLES["P7"] = "export from a sharded DCP checkpoint"`` (and a row in its docstring).  It
also runs on its own: ``python -m benchmarks.p7_sharded_export [--quick]``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import PY, REPO, BenchmarkError, child_env, figure, run_case, summary

TARGET = 1.3
LAYOUTS = {"dcp": "dcp.save default (FileSystemWriter: .distcp + .metadata)", "shards": "HuggingFaceStorageWriter (safetensors per rank)"}


def _self(case: str, params: dict[str, Any], *, timeout: float = 3600) -> dict[str, Any]:
    """Run one case of this module in a fresh interpreter; its last stdout line is the JSON result."""
    proc = subprocess.run(
        [PY, "-m", "benchmarks.p7_sharded_export", case, json.dumps(params)], cwd=REPO, env=child_env(), capture_output=True, timeout=timeout
    )
    out = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not out or not out[-1].startswith("{"):
        raise BenchmarkError(f"P7 case {case} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')[-3000:]}")
    return json.loads(out[-1])


def run(cfg: Any) -> list[dict[str, Any]]:
    width, depth = (2048, 4) if cfg.quick else (8192, 10)
    state = cfg.workdir / f"p6_wide_{width}x{depth}.safetensors"  # P6's input, reused when it is there
    model_bytes = run_case("make_state", {"path": str(state), "width": width, "depth": depth}, timeout=3600)["bytes"]
    figures = []
    for layout, what in LAYOUTS.items():
        d = cfg.workdir / f"p7_{layout}"
        shutil.rmtree(d, ignore_errors=True)
        _self("write", {"state": str(state), "dir": str(d), "layout": layout})
        runs = []
        for i in range(cfg.repeats(2, 1)):
            out = cfg.workdir / "p7_out"
            shutil.rmtree(out, ignore_errors=True)
            r = run_case(
                "p6_export",
                {"width": width, "depth": depth, "path": str(d), "out": str(out), "framework": "torch", "external_data": True if cfg.quick else None},
                timeout=3600,
            )
            cfg.log(f"P7.{layout}: round {i + 1}: {r['seconds']:.1f} s, peak +{r['rss_delta_bytes'] / 2**30:.2f} GiB, parity {'ok' if r['ok'] else 'FAILED'}")
            runs.append(r)
            shutil.rmtree(out, ignore_errors=True)
        shard_bytes = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        shutil.rmtree(d, ignore_errors=True)
        figures.append(
            figure(
                f"P7.{layout}",
                f"exporter.export of the wide MLP from a 2-rank sharded DCP checkpoint ({what}): peak RSS increase",
                "model bytes",
                [r["rss_delta_bytes"] / model_bytes for r in runs],
                op="<=",
                target=TARGET,
                ratio_is="peak RSS increase over the post-import baseline / weight bytes",
                ours=summary([r["rss_delta_bytes"] for r in runs]),
                anchor_values=summary([model_bytes]),
                unit="bytes",
                notes=f"{width}x{depth} wide MLP, {model_bytes:,} bytes of weights in {shard_bytes:,} bytes of shards; parity ok: "
                f"{all(r['ok'] for r in runs)}; seconds {[round(r['seconds'], 1) for r in runs]}; state read "
                f"{runs[-1]['stages'].get('state')} s; method: {runs[-1]['rss_method']}",
            )
        )
    if not cfg.keep:
        state.unlink(missing_ok=True)
    return figures


# ----------------------------------------------------------------------------- cases (child processes)
def _write(p: dict[str, Any]) -> dict[str, Any]:
    """Start two gloo ranks that each save their row half of the state with dcp.save."""
    from exporter import distributed

    distributed.launch([PY, "-m", "benchmarks.p7_sharded_export", "write_rank", json.dumps(p)], 2, env=child_env(), what="P7 writer")
    return {"files": sorted(f.name for f in Path(p["dir"]).iterdir())}


def _write_rank(p: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = {}
    with safe_open(p["state"], framework="pt") as f:
        for name in f.keys():
            rows = f.get_slice(name).get_shape()[0]
            part = f.get_slice(name)[rank * rows // world : (rank + 1) * rows // world]
            model[name] = DTensor.from_local(part.contiguous(), mesh, [Shard(0)], run_check=False)
    if p["layout"] == "dcp":
        dcp.save({"model": model}, checkpoint_id=p["dir"])
    else:
        dcp.save({"model": model}, storage_writer=dcp.HuggingFaceStorageWriter(p["dir"], save_distributed=True))
    dist.destroy_process_group()
    return {"rank": rank}


_CASES = {"write": _write, "write_rank": _write_rank}


def main(argv: list[str]) -> int:
    if argv and argv[0] in _CASES:
        print(json.dumps(_CASES[argv[0]](json.loads(argv[1]) if len(argv) > 1 else {})), flush=True)
        return 0
    # standalone: python -m benchmarks.p7_sharded_export [--quick]
    from benchmarks.run import Config

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as work:
        cfg = Config(quick="--quick" in argv, workdir=Path(work))
        for f in run(cfg):
            print(json.dumps(f))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
