"""Incremental exports: is the bundle on disk already what this export would write?

A bundle is **up to date** when

1. its manifest's ``built_from`` record (``exporter.provenance.record``: the checkpoint's
   hash or the seeded state's seed, the model definition's source hashes and family
   config, every option that changes the output, exporter's own source hash and the
   versions of every library involved) equals the one this export would write;
2. its last export passed (a failing bundle is always exported again: the run is
   retried, not replayed);
3. every file it lists under ``files`` is there with the recorded size and sha256, and
   nothing else is;
4. every variant asked for is up to date in the same sense (or cannot be made of the
   model: its skip reason is recomputed).

``exporter.api.export`` then reports the bundle from disk (``BundleResult.up_to_date``)
instead of exporting it; otherwise the bundle is rebuilt and ``rebuilt_because`` says why
(``--force``, no bundle yet, or what changed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter import provenance
from exporter.errors import BundleError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from exporter.bundle import BundleResult
    from exporter.plan import ExportPlan
    from exporter.variants import VariantResult

__all__ = ["checkpoint_sha256", "check", "FORCED", "previous_seconds"]

FORCED = "--force: rebuilt without checking"
_MAX_REASONS = 6


def checkpoint_sha256(plan: ExportPlan) -> str | None:
    """The content hash ``exporter.state`` records for the plan's checkpoint (None: seeded,
    or no bundle of the plan exists yet, so there is nothing to compare it with).

    Raises:
        StateFileError: the checkpoint cannot be read (as ``export`` would raise).
    """
    if plan.checkpoint is None or not any((plan.bundle_dir(fw) / "manifest.json").is_file() for fw in plan.frameworks):
        return None
    from exporter import state

    return state.inspect_state(plan.checkpoint).sha256


def previous_seconds(plan: ExportPlan) -> float:
    """Seconds the plan's bundles took when they were last built (0.0 when unknown):
    the order in which parallel workers take models, longest first."""
    total = 0.0
    for fw in plan.frameworks:
        try:
            seconds = json.loads((plan.bundle_dir(fw) / "manifest.json").read_text(encoding="utf-8")).get("seconds", {})
            total += float(seconds.get("total", 0.0))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return total


def _capped(lines: list[str]) -> list[str]:
    if len(lines) <= _MAX_REASONS:
        return lines
    return [*lines[:_MAX_REASONS], f"... and {len(lines) - _MAX_REASONS} more"]


def _stale(root: Path, manifest: dict[str, Any], expected: dict[str, Any], verdict_ok: bool, label: str = "") -> list[str]:
    """Why the bundle at ``root`` is not what ``expected`` describes ([] when it is);
    ``label`` prefixes the reasons (a variant's bundle name)."""
    changed = provenance.differences(manifest.get(provenance.RECORD_KEY), expected)
    if changed:
        return [f"{label}changed since it was built: " + "; ".join(_capped(changed))]
    if not verdict_ok:
        return [f"{label}its last export failed; exporting it again"]
    problems = provenance.check_files(root, manifest.get(provenance.FILES_KEY))
    if problems:
        return [f"{label}its files do not match its manifest: " + "; ".join(_capped(problems))]
    return []


def _read(root: Path) -> tuple[dict[str, Any] | None, str]:
    from exporter import bundle

    if not (root / bundle.MANIFEST).is_file():
        return None, f"no bundle at {root} yet"
    try:
        return bundle.read_manifest(root), ""
    except BundleError as e:
        return None, f"the manifest of {root} cannot be used ({str(e).splitlines()[0]})"


def _variant(plan: ExportPlan, framework: str, name: str, fp32_dir: Path, checkpoint: str | None) -> tuple[VariantResult | None, list[str]]:
    from exporter import variants
    from exporter.variants.publish import bundle_name

    why = variants.skip_reason(name, plan.spec, fp32_dir / "model.onnx")
    if why is not None:
        return variants.VariantResult(name, plan.spec.name, framework, None, "skipped", reason=why), []
    root = fp32_dir.parent / bundle_name(framework, name)
    manifest, missing = _read(root)
    if manifest is None:
        return None, [missing]
    expected = provenance.record(plan, framework, checkpoint, variant=name)
    stored = manifest.get("result")
    reasons = _stale(root, manifest, expected, manifest.get("verdict") == "pass" and isinstance(stored, dict), f"{root.name}: ")
    if reasons:
        return None, reasons
    try:
        res = variants.VariantResult.from_dict(stored)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, UsageError) as e:
        return None, [f"{root.name}: its recorded result cannot be read ({type(e).__name__}: {e})"]
    from dataclasses import replace

    return replace(res, path=root / "model.onnx"), []


def check(plan: ExportPlan, framework: str, checkpoint: str | None, *, force: bool = False) -> tuple[BundleResult | None, tuple[str, ...]]:
    """The bundle ``plan.bundle_dir(framework)`` as a result when it is up to date, else
    ``(None, why it must be built)``.

    Args:
        plan: the model's export plan.
        framework: the bundle's framework.
        checkpoint: :func:`checkpoint_sha256` of the plan (None for a seeded state).
        force: rebuild without checking (``--force``).
    """
    if force:
        return None, (FORCED,)
    from exporter.bundle import BundleResult
    from exporter.parity import ParityReport

    t = time.perf_counter()
    root = plan.bundle_dir(framework)
    manifest, missing = _read(root)
    if manifest is None:
        return None, (missing,)
    if plan.checkpoint is not None and checkpoint is None:  # pragma: no cover - checkpoint_sha256 found a manifest
        return None, ("the checkpoint's hash is unknown",)
    expected = provenance.record(plan, framework, checkpoint)
    parity_ok = bool((manifest.get("parity") or {}).get("ok"))
    reasons = _stale(root, manifest, expected, parity_ok)
    if reasons:
        return None, tuple(reasons)
    try:
        report = ParityReport.from_dict(json.loads((root / str(manifest["parity"]["report"])).read_text(encoding="utf-8")))
        onnx = manifest["onnx"]
        made = []
        for name in plan.variants:
            v, why = _variant(plan, framework, name, root, checkpoint)
            if v is None:
                return None, tuple(why)
            made.append(v)
        result = BundleResult(
            model=plan.spec.name,
            framework=framework,
            path=root,
            exporter=str(manifest["exporter"]),
            fallback_reason=manifest.get("fallback_reason"),
            opset=int(manifest["opset"]),
            onnx_sha256=str(onnx["sha256"]),
            external_data=onnx.get("external_data") is not None,
            checkpoint=dict(manifest["checkpoint"]),
            parity=report,
            seconds={"total": time.perf_counter() - t},
            warnings=tuple(manifest.get("export_warnings", ())),
            variants=tuple(made),
            up_to_date=True,
        )
    except (KeyError, TypeError, ValueError, UsageError, OSError) as e:
        return None, (f"{root.name}: its reports cannot be read ({type(e).__name__}: {e})",)
    return result, ()
