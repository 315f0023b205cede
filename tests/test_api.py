"""The Python API: honest ``__all__``, lazy imports, report objects, assert_parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import exporter
from exporter.errors import UnknownModelError, UsageError
from exporter.models import registry

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_all_is_honest() -> None:
    for name in exporter.__all__:
        assert getattr(exporter, name) is not None, name
    with pytest.raises(AttributeError):
        exporter.no_such_thing  # noqa: B018
    for op in ("list_models", "inspect", "export", "verify", "convert", "train"):  # the CLI's operations
        assert callable(getattr(exporter, op)), op


def test_import_is_cheap_and_lazy() -> None:
    out = _python(
        "import sys, json, exporter\n"
        "exporter.list_models()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch','jax','flax','onnx','onnxruntime','safetensors'))))"
    )
    assert json.loads(out) == []


def test_train_is_the_api_function() -> None:
    from exporter import api

    assert exporter.train is api.train
    assert "train" in exporter.__all__


def test_list_models_and_inspect(tmp_path: Path) -> None:
    infos = exporter.list_models()
    assert [m.name for m in infos] == registry.names()
    mlp = next(m for m in infos if m.name == "mlp")
    assert mlp.signature() == "x: float32[batch, 20] -> y"
    json.dumps([m.to_dict() for m in infos])
    f = exporter.save_state({"a": np.ones((2, 3), np.float32)}, tmp_path / "a.safetensors")
    info = exporter.inspect(f)
    assert info.format == "safetensors" and info.total_bytes == 24
    assert exporter.inspect_state(f) == info
    np.testing.assert_array_equal(exporter.load_state(f)["a"], np.ones((2, 3), np.float32))


def test_export_report_object(exported) -> None:
    report = exported
    assert isinstance(report, exporter.ExportReport)
    assert bool(report) and report.exit_code == 0
    d = json.loads(report.to_json())
    assert d["ok"] and len(d["results"]) == len(report.results)
    assert "PASS" in report.table()
    xml = report.to_junit_xml()
    assert xml.count("<testsuite ") == len(report.results) and 'failures="0"' in xml
    r = report.results[0]
    assert bool(r) and isinstance(r.parity, exporter.ParityReport)
    assert r.to_dict()["parity"]["ok"] is True


def test_export_validates_before_work(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="known models: .*mlp"):
        exporter.export("nope", out=tmp_path)
    with pytest.raises(UsageError, match="no model given"):
        exporter.export(out=tmp_path)
    with pytest.raises(UsageError, match="either model names or all_models"):
        exporter.export("mlp", all_models=True, out=tmp_path)
    with pytest.raises(UsageError, match="batch size 0"):
        exporter.export("mlp", batch_sizes=(0, 2), out=tmp_path)
    with pytest.raises(UsageError, match="atol"):
        exporter.export("mlp", atol=-1.0, out=tmp_path)
    with pytest.raises(UsageError, match="unknown framework 'tf'"):
        exporter.export("mlp", framework="tf", out=tmp_path)
    assert not any(tmp_path.iterdir())


def test_assert_parity_passes_and_fails_readably(tmp_path: Path) -> None:
    from exporter.testing import assert_parity, assert_verified

    report = assert_parity("mlp", framework="torch", batch_sizes=(1, 3), out=tmp_path / "ok")
    assert report.ok
    assert assert_verified(tmp_path / "ok" / "mlp" / "torch")
    # an absurdly strict tolerance makes the same export fail; the message lists each failure
    with pytest.raises(AssertionError) as info:
        assert_parity("mlp", framework="torch", batch_sizes=(1, 3), atol=0.0, rtol=0.0)
    text = str(info.value)
    assert "parity failed for 'mlp'" in text and "y @ batch=3" in text and "tolerance atol=0 rtol=0" in text


def test_convert_api(tmp_path: Path) -> None:
    from exporter import rebuild

    spec = registry.get("cnn")
    canonical = rebuild.init_state(spec, seed=1)
    src = exporter.save_state(canonical, tmp_path / "cnn.safetensors")
    rep = exporter.convert(src, tmp_path / "cnn_flax.npz", model="cnn", to="flax")
    assert rep.layout == "flax" and rep.dst_format == "npz" and rep.model == "cnn"
    flat = exporter.load_state(rep.dst)
    assert any(k.startswith("batch_stats/") for k in flat)
    back = exporter.convert(rep.dst, tmp_path / "cnn_back.safetensors", model="cnn")
    again = exporter.load_state(back.dst)
    assert sorted(again) == sorted(canonical)
    for k in canonical:
        np.testing.assert_array_equal(again[k], canonical[k])
    json.dumps(back.to_dict())
    with pytest.raises(UsageError, match="same path"):
        exporter.convert(src, src)
    with pytest.raises(UsageError, match="unknown target layout"):
        exporter.convert(src, tmp_path / "x.npz", model="cnn", to="tf")


def test_plan_export_collects_every_problem(tmp_path: Path) -> None:
    from exporter import api

    with pytest.raises(UsageError, match="the export request has 3 problems") as info:
        api.plan_export("mlp", opset=7, atol=-1.0, batch_sizes=(0,), out=tmp_path)
    assert len(info.value.problems) == 3
    assert any("opset 7" in p for p in info.value.problems) and any("batch size 0" in p for p in info.value.problems)
    (plan,) = api.plan_export("transformer", batch_sizes=(1, 3), dims={"seq": (2, 5)}, seed=4, out=tmp_path)
    assert plan.frameworks == ("torch", "flax") and plan.batch_sizes == [1, 3]
    assert [label for label, _dims, _feed in plan.runs] == ["batch=1,seq=2", "batch=1,seq=5", "batch=3,seq=2", "batch=3,seq=5"]
    assert plan.runs[3][2]["x"].shape == (3, 5, 32) and plan.bundle_dir("flax") == tmp_path / "transformer" / "flax"
    assert not any(tmp_path.iterdir())  # planning writes nothing


def test_the_state_is_read_and_checked_once_per_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both bundles of a model come from one read_state and one strict prepare_state."""
    from exporter import rebuild, state

    spec = registry.get("mlp")
    ckpt = exporter.save_state(rebuild.init_state(spec, seed=2), tmp_path / "w.safetensors")
    calls = {"read_state": 0, "prepare_state": 0}
    real_read, real_prepare = state.read_state, rebuild.prepare_state

    def read(*a, **k):
        calls["read_state"] += 1
        return real_read(*a, **k)

    def prepare(*a, **k):
        calls["prepare_state"] += 1
        return real_prepare(*a, **k)

    monkeypatch.setattr(state, "read_state", read)
    monkeypatch.setattr(rebuild, "prepare_state", prepare)
    report = exporter.export("mlp", checkpoint=ckpt, batch_sizes=(1, 3), out=tmp_path / "out")
    assert report and len(report.results) == 2
    assert calls == {"read_state": 1, "prepare_state": 1}
    assert {r.checkpoint["sha256"] for r in report.results} == {state.sha256_path(ckpt)}
    calls.update(read_state=0, prepare_state=0)
    seeded = exporter.export("mlp", batch_sizes=(1,), out=tmp_path / "seeded")  # the seeded state: read back once too
    assert seeded and calls == {"read_state": 1, "prepare_state": 1}
