"""The HTML report: one self-contained file over every bundle, checked in a real browser.

The browser tests open the report in headless Chromium (``exporter.runtimes.browser.snapshot``),
save a screenshot under tmp_path, and check that verdicts and plots rendered, that nothing
was fetched from the network and that the console stayed clean.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_unless_ci

from exporter import report as report_mod
from exporter.errors import BundleError, MissingDependencyError, UsageError
from exporter.report import BIN_EDGES, CaseErrors, _case_errors


@pytest.fixture(scope="module")
def html_report(exported, tmp_path_factory: pytest.TempPathFactory) -> report_mod.Report:
    return report_mod.report(exported.out, html=tmp_path_factory.mktemp("report") / "report.html")


@pytest.fixture(scope="module")
def failing_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real failing bundle: mlp exported from torch with a tolerance nothing meets."""
    import exporter

    out = tmp_path_factory.mktemp("failing")
    r = exporter.export("mlp", framework="torch", out=out, atol=1e-12, rtol=1e-12, intra_op_threads=1)
    assert not r.ok
    return out


def _snapshot(page: Path, png: Path, **kw) -> dict:
    from exporter.runtimes import browser

    try:
        return browser.snapshot(page, png, **kw)
    except MissingDependencyError as e:
        skip_unless_ci(f"no browser to render the report: {e}")


# --------------------------------------------------------------------------- content
def test_one_row_per_bundle_with_the_verdict_and_worst_error(exported, html_report: report_mod.Report) -> None:
    rows = html_report.rows
    assert {(r.model, r.framework, r.variant) for r in rows} == {(x.model, x.framework, "fp32") for x in exported.results}
    for r in rows:
        assert r.ok and r.failing == 0 and not r.notes, (r.model, r.framework, r.notes)
        assert 0 < r.worst < 1  # within tolerance, and not suspiciously exact
        data_cases = {s["case"] for s in r.manifest["test_data_sets"]}
        data_checks = [c for c in r.parity["checks"] if c["case"] in data_cases]  # not generation steps
        assert len(r.errors) == len(data_checks)  # a picture per (output, test data case)
        assert sum(e.n for e in r.errors) == sum(c["n_total"] for c in data_checks)
        for e in r.errors:
            assert sum(e.counts) == e.n and e.n_bad == 0
    assert html_report.ok and html_report.to_dict()["ok"] is True


def test_terminal_summary_table(html_report: report_mod.Report) -> None:
    lines = html_report.table().splitlines()
    assert lines[0].split() == ["model", "framework", "variant", "verdict", "worst/tol", "cases", "time"]
    assert len(lines) == len(html_report.rows) + 3  # header, rows, verdict, report path
    for line, row in zip(lines[1:], html_report.rows):
        assert line.split()[:4] == [row.model, row.framework, "fp32", "PASS"] and line.split()[4].endswith("x")
    assert lines[-2].startswith(f"PASS: {len(html_report.rows)} bundles under ") and lines[-1] == f"report: {html_report.html}"
    assert all(ord(ch) < 128 for ch in html_report.table())  # any terminal encoding


def test_the_file_is_self_contained(html_report: report_mod.Report) -> None:
    text = html_report.html.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*['"]?\s*(https?:|//)""", text, re.I)
    assert "<script src" not in text and "@import" not in text and "url(" not in text
    assert text.count("<svg class='hist") == sum(len(r.errors) for r in html_report.rows)
    m = html_report.rows[0].manifest
    assert m["onnx"]["sha256"] in text and m["exporter"] in text  # provenance is in it
    assert [p.name for p in html_report.html.parent.iterdir()] == ["report.html"]  # atomic: no temp left


def test_a_failing_bundle_is_shown_failing(failing_out: Path, tmp_path: Path) -> None:
    rep = report_mod.report(failing_out, html=tmp_path / "r.html")
    (row,) = rep.rows
    assert not rep.ok and not row.ok and row.failing == row.checks
    assert row.worst > 1 and all(e.n_bad > 0 for e in row.errors if e.n > 0)
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "badge fail" in text and "svg class='hist bad'" in text and "elements out of tolerance" in text


def test_without_rerun_the_worst_error_comes_from_parity_json(exported, tmp_path: Path) -> None:
    exact = report_mod.collect(exported.out / "mlp" / "torch").rows[0].worst
    (row,) = report_mod.collect(exported.out / "mlp" / "torch", rerun=False).rows
    assert row.errors == () and row.worst == pytest.approx(exact, rel=1e-6)  # the sweep's own worst_tol
    # a parity.json written before worst_tol existed: max_rel / rtol bounds the fraction within 2x
    d = tmp_path / "old"
    shutil.copytree(exported.out / "mlp" / "torch", d)
    parity = json.loads((d / "parity.json").read_text(encoding="utf-8"))
    for c in parity["checks"]:
        del c["worst_tol"]
    (d / "parity.json").write_text(json.dumps(parity), encoding="utf-8")
    (old,) = report_mod.collect(d, rerun=False).rows
    assert exact <= old.worst <= 2 * exact + 1e-12


def test_sections_hook(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "out" / "mlp" / "torch"
    shutil.copytree(exported.out / "mlp" / "torch", d)
    manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    manifest["metrics"] = {"report": {"variant": "int8", "ok": True, "metrics": [
        {"output": "y", "kind": "logits", "metric": "top1_agreement", "value": 0.999, "threshold": 0.95, "rows": 64, "ok": True}]}}
    manifest["generation"] = {"sets": [{"case": "batch=1 prompts=5", "batch": 1, "new_tokens": 42, "prompt_lengths": [5]}],
                              "reference": "torch", "summary": {"ok": True, "steps_compared": 42, "tokens_generated": 42}}
    (d / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    monkeypatch.setitem(report_mod.SECTIONS, "Runtimes verified", lambda row: f"<p id='hook'>{row.model}</p>")
    text = report_mod.render_html(report_mod.collect(tmp_path / "out"))
    assert "<h3>Task metrics</h3>" in text and "top1_agreement" in text and "0.999" in text
    assert "<h3>Generation steps</h3>" in text and "<td>42</td>" in text and "42 steps compared" in text
    assert "<p id='hook'>mlp</p>" in text
    with pytest.raises(UsageError, match="must be callable"):
        report_mod.register_section("x", "not a function")


def test_no_bundles_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="holds no exporter bundle"):
        report_mod.report(tmp_path, html=tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_error_fractions_per_element() -> None:
    ref = np.array([0.0, 1.0, 100.0, np.nan, np.inf, 2.0], np.float32)
    cand = np.array([1e-5, 1.0001, 100.02, np.nan, np.inf, np.nan], np.float32)
    e = _case_errors("y", "batch=1", ref, cand, 1e-5, 1e-4)
    # 1e-5 / 1e-5 = 1 (exactly at tolerance: passes), ~0.9, ~1.8 out, NaN==NaN, Inf==Inf, NaN mismatch
    assert e.n == 6 and e.nonfinite == 1 and e.n_bad == 2 and e.worst == float("inf")
    assert sum(e.counts) == 6 and e.counts[-1] == 1 and e.counts[0] == 2
    tol_bin = BIN_EDGES.index(1.0)
    assert sum(e.counts[: tol_bin + 1]) == 4  # everything that passes lies left of the line
    ints = _case_errors("z", "batch=1", np.array([1, 2, 3]), np.array([1, 2, 4]), 0.0, 0.0)
    assert ints.exact and ints.n_bad == 1 and ints.counts == ()
    assert isinstance(ints, CaseErrors)


# --------------------------------------------------------------------------- in a real browser
def test_the_report_renders_in_chromium(html_report: report_mod.Report, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    seen = _snapshot(html_report.html, png, selectors=["svg.hist", ".badge.pass", ".badge.fail", "table.summary tr"])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen["console_errors"] == [] and seen["blocked"] == []
    n_plots = sum(len(r.errors) for r in html_report.rows)
    assert seen["counts"]["svg.hist"] == n_plots
    assert seen["counts"]["table.summary tr"] == len(html_report.rows) + 1
    assert seen["counts"][".badge.fail"] == 0 and seen["counts"][".badge.pass"] >= len(html_report.rows)
    plots = seen["svg"]
    assert len(plots) == n_plots and all(s["children"] >= 5 and s["width"] > 100 and s["height"] > 50 for s in plots)
    for r in html_report.rows:
        assert f"{r.model} · {r.framework} · fp32" in seen["text"]
    assert "exporter report: PASS" in seen["text"]


def test_a_failing_report_renders_red(failing_out: Path, tmp_path: Path) -> None:
    rep = report_mod.report(failing_out, html=tmp_path / "r.html")
    seen = _snapshot(rep.html, tmp_path / "r.png", selectors=["svg.hist.bad", ".badge.fail", "svg .over"], full_page=False)
    assert seen["console_errors"] == []
    assert seen["counts"]["svg.hist.bad"] == rep.rows[0].checks and seen["counts"][".badge.fail"] >= 2
    assert seen["counts"]["svg .over"] > 0  # bars right of the tolerance line
    assert "exporter report: FAIL" in seen["text"]


def test_snapshot_blocks_the_network(tmp_path: Path) -> None:
    page = tmp_path / "p.html"
    page.write_text(
        "<!doctype html><html><head><link rel='icon' href='data:,'></head><body><svg><rect width='5' height='5'/></svg>"
        "<img src='http://127.0.0.1:9/x.png'></body></html>",
        encoding="utf-8",
    )
    seen = _snapshot(page, tmp_path / "p.png")
    assert seen["blocked"] == ["http://127.0.0.1:9/x.png"]
    assert seen["counts"]["svg"] == 1



# --------------------------------------------------------------------------- command line
def test_cli_report_and_inspect(exported, failing_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exporter.cli import main

    html = tmp_path / "report.html"
    assert main(["report", str(exported.out / "mlp"), "--html", str(html)]) == 0  # both mlp bundles
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["model", "framework", "variant", "verdict"]
    assert f"report: {html}" in out and html.read_text(encoding="utf-8").startswith("<!doctype html>")
    assert main(["report", str(failing_out), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
    assert main(["inspect", str(exported.out / "mlp" / "torch")]) == 0
    out = capsys.readouterr().out
    assert "bundle, model.onnx" in out and "verdict: PASS" in out and "x: float32[batch, 20]" in out
    assert main(["inspect", str(exported.out / "mlp" / "torch" / "model.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"][0]["dims"] == ["batch", 20]
    assert main(["inspect", str(exported.out / "mlp" / "torch" / "state.safetensors")]) == 0  # a state: as before
    assert "safetensors" in capsys.readouterr().out
