"""P5: full training checkpoint save (with fsync) and load vs raw write+fsync / raw read of the same bytes.

Ours: ``exporter.checkpoint.save_checkpoint`` (safetensors per tensor group streamed from
the arrays, per-tensor and per-file BLAKE3 computed while writing, manifest, temp dir +
fsync of every file + rename + fsync of the parent) and ``exporter.checkpoint.load_checkpoint``
(reads every file once into one buffer, verifies every file's BLAKE3 while reading, returns
the tensors as views of those buffers).  Anchor: writing the very bytes of that checkpoint's
files with ``os.write`` + ``fsync`` per file + ``fsync`` of the directory, and reading them
back with ``read()``.  The strict load rows (``P5.load_strict``, ``P5.load_cold_strict``)
read them with ``readinto`` into a new numpy buffer per file instead: the same allocation as
our loader (numpy's buffers get transparent huge pages, which makes filling fresh memory
several times cheaper than ``read()`` into new bytes), so they show what hashing and parsing
cost on top of the bare reads.
The checkpoint is what the torch training driver stores for the wide MLP (model, AdamW
moments, scheduler, RNG).  Throughput ratio = anchor seconds / our seconds.

Loads are measured twice: with the files hot in the page cache (right after writing them:
the strict case, where the raw read is a memory copy) and cold (page cache dropped for the
files first: a resume after a crash or on another machine).
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import figure, run_case, summary

TARGET = 0.8


def run(cfg: Any) -> list[dict[str, Any]]:
    width, depth = (1024, 4) if cfg.quick else (2048, 8)
    r = run_case(
        "p5_checkpoint",
        {"dir": str(cfg.workdir / "p5"), "width": width, "depth": depth, "rounds": cfg.repeats(7, 3)},
        timeout=3600,
    )
    s = r["seconds"]
    note = f"{width}x{depth} wide MLP + AdamW: checkpoint of {r['bytes']:,} bytes (model {r['model_bytes']:,})"
    pairs = [
        ("P5.save", "save_checkpoint (fsync)", "raw write + fsync of the same bytes", "save", "save_raw", ""),
        ("P5.load", "load_checkpoint (hashes verified), page cache hot", "raw read of the same bytes, hot", "load", "load_raw", ""),
        (
            "P5.load_cold",
            "load_checkpoint (hashes verified), page cache dropped",
            "raw read of the same bytes, cold",
            "load_cold",
            "load_raw_cold",
            "; page cache dropped with posix_fadvise(DONTNEED) before each load",
        ),
        (
            "P5.load_strict",
            "load_checkpoint (hashes verified), page cache hot",
            "raw readinto a new numpy buffer per file, hot",
            "load",
            "load_into",
            "; strict anchor: the same buffer allocation as ours, so only hashing and parsing show",
        ),
        (
            "P5.load_cold_strict",
            "load_checkpoint (hashes verified), page cache dropped",
            "raw readinto a new numpy buffer per file, cold",
            "load_cold",
            "load_into_cold",
            "; strict anchor; page cache dropped with posix_fadvise(DONTNEED) before each read",
        ),
    ]
    return [
        figure(
            fid,
            measure,
            anchor,
            [a / o for a, o in zip(s[anchor_key], s[ours_key])],
            op=">=",
            target=TARGET,
            ratio_is="anchor seconds / our seconds (throughput ratio)",
            ours=summary(s[ours_key]),
            anchor_values=summary(s[anchor_key]),
            notes=note + extra,
        )
        for fid, measure, anchor, ours_key, anchor_key, extra in pairs
    ]
