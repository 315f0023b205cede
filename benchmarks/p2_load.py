"""P2: load a ~512 MB safetensors state into a torch model; peak RSS.

Ours: ``exporter.state.load_state`` -> ``exporter.rebuild.prepare_state`` (names, shapes,
dtypes checked) -> ``exporter.rebuild.torch_module`` (a ready ``torch.nn.Module``).
Anchors, each in its own fresh process, interleaved with ours, file hot in the page cache:

* ``safetensors.torch.load_model`` into a model built by the same process (construction
  + load: what a user writes to get a loaded model; ours also builds the model);
* ``safetensors.torch.load_model`` alone, into a model built before the clock starts
  (stricter: the anchor's construction and its page faults are free).

Throughput ratio = anchor seconds / our seconds (>= 1.0 is at least as fast).  Peak RSS
is the increase of the process's high-water mark over the measured section (baseline:
the same process after importing torch, safetensors and exporter), divided by the bytes
of the model's tensors.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import figure, run_case, summary, warm

THROUGHPUT_TARGET = 1.0
RSS_TARGET = 1.2


def run(cfg: Any) -> list[dict[str, Any]]:
    width, depth = (2048, 8) if cfg.quick else (4096, 8)
    path = cfg.workdir / f"p2_wide_{width}x{depth}.safetensors"
    model_bytes = run_case("make_state", {"path": str(path), "width": width, "depth": depth})["bytes"]
    params = {"path": str(path), "width": width, "depth": depth}
    warm(path)
    run_case("p2_ours", params)  # warm-up: bytecode caches, page cache
    ours, anchor, anchor_build = [], [], []
    for _ in range(cfg.repeats(7, 3)):
        anchor_build.append(run_case("p2_anchor_build", params))
        ours.append(run_case("p2_ours", params))
        anchor.append(run_case("p2_anchor", params))
    checks = {r["check"] for r in ours + anchor + anchor_build}
    assert len(checks) == 1, f"P2: loaded weights differ between ours and the anchors: {checks}"
    t_ours = [r["seconds"] for r in ours]
    mb = model_bytes / 2**20
    note = f"{width}x{depth} wide MLP, {model_bytes:,} bytes of float32 tensors ({mb:.0f} MiB); file hot in the page cache"
    figs = [
        figure(
            "P2.throughput",
            "load_state + prepare_state + torch_module (file -> checked, ready torch model)",
            "model construction + safetensors.torch.load_model",
            [b["seconds"] / o for b, o in zip(anchor_build, t_ours)],
            op=">=",
            target=THROUGHPUT_TARGET,
            ratio_is="anchor seconds / our seconds (throughput ratio)",
            ours=summary(t_ours),
            anchor_values=summary([r["seconds"] for r in anchor_build]),
            notes=note,
        ),
        figure(
            "P2.throughput_prebuilt",
            "load_state + prepare_state + torch_module (file -> checked, ready torch model)",
            "safetensors.torch.load_model into a model built before timing",
            [a["seconds"] / o for a, o in zip(anchor, t_ours)],
            op=">=",
            target=THROUGHPUT_TARGET,
            ratio_is="anchor seconds / our seconds (throughput ratio)",
            ours=summary(t_ours),
            anchor_values=summary([r["seconds"] for r in anchor]),
            notes=note + "; stricter anchor: its model construction (and first touch of its memory) is not timed",
        ),
        figure(
            "P2.rss",
            "peak RSS increase while loading (ours)",
            "model bytes",
            [r["rss_delta_bytes"] / model_bytes for r in ours],
            op="<=",
            target=RSS_TARGET,
            ratio_is="peak RSS increase over the post-import baseline / model bytes",
            ours=summary([r["rss_delta_bytes"] for r in ours]),
            anchor_values=summary([r["rss_delta_bytes"] for r in anchor_build]),
            unit="bytes",
            notes=note + f"; anchor_values = construction + load_model's increase; method: {ours[0]['rss_method']}",
        ),
    ]
    if not cfg.keep:
        path.unlink(missing_ok=True)
    return figs
