"""P6: export of a model with >= 2.5 GB of weights (ONNX external data); peak RSS vs model bytes.

The model is a wide MLP registered by the benchmark itself (``benchmarks.wide``: 10 x
Linear(8192, 8192), 2.5 GiB of float32 weights), saved once as safetensors.  One fresh
process runs ``exporter.export(name, checkpoint=FILE, framework="torch")`` through our
API: load + check the state, rebuild the torch model, export with
``torch.onnx.export(dynamo=True)`` writing ``model.onnx.data``, the parity sweep in
onnxruntime at batch 1, 2, 7, 64, and the bundle.  The figure is the increase of the
process's peak RSS over its post-import baseline, divided by the bytes of the weights.
Quick mode uses a 64 MiB model with external data forced, to exercise the same path.
"""

from __future__ import annotations

import shutil
from typing import Any

from benchmarks import wide
from benchmarks.common import figure, run_case, summary

TARGET = 2.0


def run(cfg: Any) -> list[dict[str, Any]]:
    width, depth = (2048, 4) if cfg.quick else (8192, 10)
    path = cfg.workdir / f"p6_wide_{width}x{depth}.safetensors"
    model_bytes = run_case("make_state", {"path": str(path), "width": width, "depth": depth}, timeout=3600)["bytes"]
    runs = []
    for i in range(cfg.repeats(2, 1)):
        out = cfg.workdir / "p6_out"
        shutil.rmtree(out, ignore_errors=True)
        r = run_case(
            "p6_export",
            {
                "width": width,
                "depth": depth,
                "path": str(path),
                "out": str(out),
                "framework": "torch",
                "external_data": True if cfg.quick else None,
            },
            timeout=3600,
        )
        cfg.log(f"P6: round {i + 1}: {r['seconds']:.1f} s, peak +{r['rss_delta_bytes'] / 2**30:.2f} GiB, parity {'ok' if r['ok'] else 'FAILED'}")
        runs.append(r)
        shutil.rmtree(out, ignore_errors=True)
    if not cfg.keep:
        path.unlink(missing_ok=True)
    assert all(r["external_data"] for r in runs), "P6: the export did not use external data"
    return [
        figure(
            "P6",
            "exporter.export of the wide MLP from its safetensors checkpoint (torch, external data, parity sweep, bundle): peak RSS increase",
            "model bytes",
            [r["rss_delta_bytes"] / model_bytes for r in runs],
            op="<=",
            target=TARGET,
            ratio_is="peak RSS increase over the post-import baseline / weight bytes",
            ours=summary([r["rss_delta_bytes"] for r in runs]),
            anchor_values=summary([model_bytes]),
            unit="bytes",
            notes=f"{width}x{depth} wide MLP, {model_bytes:,} bytes of weights; parity ok: {all(r['ok'] for r in runs)}; "
            f"seconds {[round(r['seconds'], 1) for r in runs]}; stages (last) {runs[-1]['stages']}; method: {runs[-1]['rss_method']}",
        )
    ]
