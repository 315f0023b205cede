"""Incremental exports (exporter.incremental / exporter.provenance) and ``export --jobs``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import exporter
from exporter import incremental, provenance
from exporter.errors import UsageError

SMALL = dict(framework="torch", batch_sizes=(1, 2))


def _export(out: Path, model: str | list[str] = "mlp", **kw):
    return exporter.export(model, out=out, **{**SMALL, **kw})


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small mlp bundle (torch), built once; tests copy it."""
    out = tmp_path_factory.mktemp("inc") / "out"
    report = _export(out)
    assert report.ok and not report.results[0].up_to_date
    return out


@pytest.fixture
def out(built, tmp_path):
    import shutil

    dst = tmp_path / "out"
    shutil.copytree(built, dst)
    return dst


def test_the_manifest_records_what_the_bundle_is_made_from_and_every_file(built):
    bundle = built / "mlp" / "torch"
    m = _manifest(bundle)
    record = m[provenance.RECORD_KEY]
    assert record["state"] == {"seeded": True, "seed": 0, "initialised_by": "torch"}
    assert "exporter.models.mlp" in record["definition"]["sources"]
    assert set(record["options"]) >= {"opset", "sweep_sha256", "atol", "rtol", "external_data", "intra_op_threads"}
    assert record["versions"]["torch"] and record["versions"]["onnxruntime"] and record["exporter_source_sha256"]
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(m[provenance.FILES_KEY]) == on_disk
    assert m[provenance.FILES_KEY]["model.onnx"]["sha256"] == m["onnx"]["sha256"]


def test_a_second_export_with_nothing_changed_rebuilds_nothing(out):
    before = _manifest(out / "mlp" / "torch")
    report = _export(out)
    (r,) = report.results
    assert report.ok and report.exit_code == 0 and r.up_to_date and not r.rebuilt_because
    assert _manifest(out / "mlp" / "torch") == before  # not rewritten
    assert r.parity.ok and r.onnx_sha256 == before["onnx"]["sha256"] and r.checkpoint == before["checkpoint"]
    assert "1 up to date (not rebuilt)" in report.summary()
    again = exporter.api.ExportReport.from_dict(json.loads(report.to_json()))
    assert again.results[0].up_to_date


def test_force_rebuilds(out):
    (r,) = _export(out, force=True).results
    assert not r.up_to_date and r.rebuilt_because == (incremental.FORCED,)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (dict(opset=18), "options.opset"),
        pytest.param(dict(batch_sizes=(1, 3)), "options.sweep_sha256", marks=pytest.mark.slow),
        pytest.param(dict(seed=1), "state.seed", marks=pytest.mark.slow),
        pytest.param(dict(atol=1e-3), "options.atol", marks=pytest.mark.slow),
        pytest.param(dict(intra_op_threads=1), "options.intra_op_threads", marks=pytest.mark.slow),
    ],
)
def test_an_option_that_changes_the_output_rebuilds_and_says_which(out, change, key):
    (r,) = _export(out, **change).results
    assert not r.up_to_date and r.parity.ok
    assert len(r.rebuilt_because) == 1 and key in r.rebuilt_because[0], r.rebuilt_because


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda b: (b / "test_data_set_0" / "output_0.pb").write_bytes(b"\0" * 8), "test_data_set_0/output_0.pb: size changed"),
        pytest.param(lambda b: (b / "parity.junit.xml").unlink(), "parity.junit.xml: missing", marks=pytest.mark.slow),
        pytest.param(lambda b: (b / "notes.txt").write_text("x"), "notes.txt: not written by the export", marks=pytest.mark.slow),
    ],
)
def test_a_damaged_bundle_is_rebuilt_and_the_file_is_named(out, damage, why):
    damage(out / "mlp" / "torch")
    (r,) = _export(out).results
    assert not r.up_to_date and r.parity.ok
    assert why in r.rebuilt_because[0], r.rebuilt_because
    assert provenance.check_files(out / "mlp" / "torch", _manifest(out / "mlp" / "torch")[provenance.FILES_KEY]) == []


def test_same_size_content_change_is_caught_by_the_hash(out):
    f = out / "mlp" / "torch" / "model.onnx"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    (r,) = _export(out).results
    assert not r.up_to_date and "model.onnx: content changed (sha256)" in r.rebuilt_because[0]


@pytest.mark.slow
def test_a_bundle_without_a_record_is_rebuilt(out):
    bundle = out / "mlp" / "torch"
    m = _manifest(bundle)
    del m[provenance.RECORD_KEY]
    (bundle / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    (r,) = _export(out).results
    assert not r.up_to_date and "older exporter" in r.rebuilt_because[0]


@pytest.mark.slow
def test_a_failing_bundle_is_always_exported_again(tmp_path):
    out = tmp_path / "out"
    first = _export(out, atol=0.0, rtol=0.0, explain_failures=False)
    assert not first.ok and first.exit_code == 1
    (r,) = _export(out, atol=0.0, rtol=0.0, explain_failures=False).results
    assert not r.up_to_date and "last export failed" in r.rebuilt_because[0]


def test_a_changed_checkpoint_rebuilds_and_the_same_content_elsewhere_does_not(out, tmp_path):
    from exporter import state

    seeded = out / "mlp" / "torch" / "state.safetensors"
    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes(seeded.read_bytes())
    out2 = tmp_path / "out2"
    assert not _export(out2, checkpoint=ckpt).results[0].up_to_date
    assert _export(out2, checkpoint=ckpt).results[0].up_to_date
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(ckpt.read_bytes())
    assert _export(out2, checkpoint=moved).results[0].up_to_date  # content, not path
    arrays = state.load_state(ckpt)
    arrays = {k: (v + np.float32(0.01) if k.endswith("bias") else v) for k, v in arrays.items()}
    state.save_state(arrays, ckpt)
    (r,) = _export(out2, checkpoint=ckpt).results
    assert not r.up_to_date and "state.sha256" in r.rebuilt_because[0]
    assert _manifest(out2 / "mlp" / "torch")["checkpoint"]["sha256"] == state.inspect_state(ckpt).sha256


@pytest.mark.slow
def test_only_the_changed_model_is_rebuilt(tmp_path):
    out = tmp_path / "out"
    _export(out, ["mlp", "cnn"])
    bundle = out / "cnn" / "torch"
    m = _manifest(bundle)
    m[provenance.RECORD_KEY]["definition"]["sources"]["exporter.models.cnn"] = "0" * 64  # as if cnn.py had changed
    (bundle / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    lines: list[str] = []
    report = _export(out, ["mlp", "cnn"], progress=lines.append)
    mlp, cnn = report.results
    assert mlp.up_to_date and not cnn.up_to_date
    assert "definition.sources.exporter.models.cnn: changed" in cnn.rebuilt_because[0]
    assert "[1/2] mlp (torch): PASS, up to date" in lines[0]
    assert any("cnn (torch): exporting (changed since it was built" in line for line in lines)


@pytest.mark.slow
def test_variants_are_part_of_the_check(tmp_path):
    out = tmp_path / "out"
    first = _export(out, variants="fp16")
    assert first.ok and first.results[0].variants[0].status == "pass"
    second = _export(out, variants="fp16")
    (r,) = second.results
    assert r.up_to_date and r.variants[0].status == "pass"
    assert r.variants[0].path == out / "mlp" / "torch-fp16" / "model.onnx"
    as_json = lambda v: json.loads(json.dumps(v.to_dict() | {"path": None}))  # noqa: E731
    assert as_json(r.variants[0]) == as_json(first.results[0].variants[0])
    # another variant asked for: its bundle is missing, so the model is rebuilt
    (r,) = _export(out, variants="fp16,optimized").results
    assert not r.up_to_date and "torch-optimized" in r.rebuilt_because[0]
    # a damaged variant bundle
    (out / "mlp" / "torch-fp16" / "parity.json").write_text("{}")
    (r,) = _export(out, variants="fp16").results
    assert not r.up_to_date and "torch-fp16: its files do not match" in r.rebuilt_because[0]


def test_jobs_must_be_positive(out):
    with pytest.raises(UsageError, match="jobs must be a positive int"):
        _export(out, jobs=0)


def test_jobs_refuse_models_registered_in_main(out, monkeypatch):
    from exporter.models import registry

    monkeypatch.setitem(registry._ORIGINS, "cnn", "__main__")
    with pytest.raises(UsageError, match=r"registered in __main__ \(cnn\)"):
        _export(out, ["mlp", "cnn"], jobs=2, force=True)


def test_cli_force_and_jobs_flags(out, capsys):
    from exporter import cli

    assert cli.main(["export", "mlp", "--framework", "torch", "--batch-sizes", "1,2", "--out", str(out)]) == 0
    assert "PASS, up to date" in capsys.readouterr().out
    assert cli.main(["export", "mlp", "--framework", "torch", "--batch-sizes", "1,2", "--out", str(out), "--force", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"][0]["up_to_date"] is False and doc["results"][0]["rebuilt_because"] == [incremental.FORCED]
    assert cli.main(["export", "mlp", "--out", str(out), "--jobs", "0"]) == 2


# --------------------------------------------------------------------------- in new processes
def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


PLUGIN = '''
from exporter.models import mlp
from exporter.models.registry import register
from dataclasses import replace
import helper_layers  # imported by the model module: part of its definition

SPEC = register(replace(mlp.SPEC, name="mymlp", summary="a user's model " + helper_layers.TAG))
'''


@pytest.mark.slow
def test_editing_a_user_models_source_rebuilds_it(tmp_path):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "helper_layers.py").write_text("TAG = 'v1'\n")
    args = ["--registry", "mymodels", "export", "mymlp", "mlp", "--framework", "torch", "--batch-sizes", "1", "--out", "out", "--json"]
    env = {"PYTHONPATH": str(tmp_path)}
    first = _cli(*args, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    second = json.loads(_cli(*args, cwd=tmp_path, env=env).stdout)
    assert [r["up_to_date"] for r in second["results"]] == [True, True]
    (tmp_path / "helper_layers.py").write_text("TAG = 'v2'\n")
    third = json.loads(_cli(*args, cwd=tmp_path, env=env).stdout)
    mine, theirs = third["results"]
    assert mine["model"] == "mymlp" and not mine["up_to_date"] and theirs["up_to_date"]
    assert "definition.sources.helper_layers: changed" in mine["rebuilt_because"][0]


@pytest.mark.slow
def test_jobs_2_gives_the_serial_report_order_and_exit_code(tmp_path):
    serial = _export(tmp_path / "a", ["transformer", "mlp", "cnn"], framework="all", atol=0.0, rtol=0.0, explain_failures=False)
    lines: list[str] = []
    parallel = _export(
        tmp_path / "b", ["transformer", "mlp", "cnn"], framework="all", atol=0.0, rtol=0.0, explain_failures=False,
        jobs=2, progress=lines.append,
    )  # fmt: skip
    key = [(r.model, r.framework) for r in serial.results]
    assert key == [(r.model, r.framework) for r in parallel.results] == [
        ("transformer", "torch"), ("transformer", "flax"), ("mlp", "torch"), ("mlp", "flax"), ("cnn", "torch"), ("cnn", "flax"),
    ]  # fmt: skip
    assert parallel.exit_code == serial.exit_code == 1
    assert [r.onnx_sha256 for r in parallel.results] == [r.onnx_sha256 for r in serial.results]  # the same bundles
    assert [r.parity.ok for r in parallel.results] == [r.parity.ok for r in serial.results]
    assert sum(": exporting" in line for line in lines) == 6 and sum("FAIL" in line or "PASS" in line for line in lines) == 6
    assert sorted(int(line[1]) for line in lines if "exporting" not in line) == [1, 2, 3, 4, 5, 6]
    # default tolerances: rebuilt (the failing bundles, and options.atol changed), all pass
    passing = _export(tmp_path / "b", ["transformer", "mlp", "cnn"], framework="all", jobs=2)
    assert passing.exit_code == 0 and not any(r.up_to_date for r in passing.results)
    # nothing changed: the parallel run starts no worker and reads every bundle back
    again = _export(tmp_path / "b", ["transformer", "mlp", "cnn"], framework="all", jobs=2)
    assert all(r.up_to_date for r in again.results) and again.exit_code == 0


KILLER = '''
import os, signal
from dataclasses import replace
from exporter.models import mlp
from exporter.models.registry import register

def _dies():
    os.kill(os.getpid(), signal.SIGKILL)

SPEC = register(replace(mlp.SPEC, name="dies", torch_factory=_dies, flax_factory=None, frameworks=("torch",)))
'''


@pytest.mark.slow
def test_a_worker_that_dies_fails_only_its_model(tmp_path):
    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER))
    got = _cli(
        "--registry", "killer", "export", "mlp", "dies", "cnn", "--framework", "torch", "--batch-sizes", "1", "--out", "out",
        "--jobs", "2", "--json", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert got.returncode == 2, got.stderr
    doc = json.loads(got.stdout)
    assert [(r["model"], r["ok"]) for r in doc["results"]] == [("mlp", True), ("cnn", True)]
    (err,) = doc["errors"]
    assert err["model"] == "dies" and err["error"] == "ExportError" and "worker process died" in err["message"]
    assert "Traceback" not in got.stderr
