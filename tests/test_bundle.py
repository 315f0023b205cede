"""Bundle layout, atomic writes, test data in the ONNX model-zoo layout, and verify()
without torch or jax."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter import bundle, testdata
from exporter.errors import BundleError
from exporter.models import registry

MODELS = registry.names()
PAIRS = [(m, fw) for m in MODELS for fw in registry.get(m).frameworks]
REPO = Path(__file__).resolve().parents[1]


def _path(exported, model: str, framework: str) -> Path:
    return exported.out / model / framework


@pytest.mark.parametrize(("model", "framework"), PAIRS, ids=[f"{m}-{f}" for m, f in PAIRS])
def test_bundle_layout(exported, model: str, framework: str) -> None:
    d = _path(exported, model, framework)
    for name in ("model.onnx", "manifest.json", "parity.json", "parity.junit.xml", "state.safetensors"):
        assert (d / name).is_file(), name
    assert not (d / "model.onnx.data").exists()  # small models stay in one file
    manifest = json.loads((d / "manifest.json").read_text())
    sets = manifest["test_data_sets"]
    spec = registry.get(model)
    # one test data set per swept case: batch sizes crossed with the model's sweep dims
    expected = [{"batch": b} for b in (1, 2, 7, 64)]
    for dim, sizes in spec.sweep_dims.items():
        expected = [{**e, dim: n} for e in expected for n in sizes]
    assert [{k: s["dims"][k] for k in e} for s, e in zip(sets, expected)] == expected and len(sets) == len(expected)
    assert sorted(p.name for p in d.glob("test_data_set_*")) == sorted(s["dir"] for s in sets)
    graph = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
    for s in sets:
        inputs, outputs = testdata.read_test_data(d / s["dir"])
        assert list(inputs) == [i.name for i in graph.input] == [t.name for t in spec.inputs]
        assert list(outputs) == [o.name for o in graph.output] == list(spec.outputs)
        assert inputs[spec.inputs[0].name].shape[0] == s["dims"]["batch"]
    parity = json.loads((d / "parity.json").read_text())
    assert parity["ok"] is True and parity["model"] == model
    assert 'failures="0"' in (d / "parity.junit.xml").read_text()
    assert manifest["onnxruntime"]["providers"] == ["CPUExecutionProvider"]
    # no temp leftovers beside the bundles
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("model", MODELS)
def test_test_data_outputs_are_the_original_frameworks(exported, model: str) -> None:
    """output_<i>.pb hold what torch / jax computed, not what onnxruntime did."""
    from exporter import state
    from exporter.runtimes.jax import JaxRuntime
    from exporter.runtimes.torch import TorchRuntime

    spec = registry.get(model)
    for fw, cls in (("torch", TorchRuntime), ("flax", JaxRuntime)):
        d = _path(exported, model, fw)
        rt = cls(spec, state.load_state(d / "state.safetensors"))
        inputs, outputs = testdata.read_test_data(d / "test_data_set_1")
        again = rt.run(inputs)
        for name, value in outputs.items():
            np.testing.assert_array_equal(again[name], value, err_msg=f"{model} {fw} {name}")


def test_verify_needs_neither_torch_nor_jax(exported) -> None:
    """Every fresh bundle verifies in a process that never imports torch, jax or flax."""
    paths = [str(_path(exported, m, fw)) for m, fw in PAIRS]
    code = (
        "import sys, json\n"
        "import exporter\n"
        f"paths = {paths!r}\n"
        "bad = [p for p in paths if not exporter.verify(p, intra_op_threads=1)]\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'jaxlib', 'flax', 'jax2onnx'))\n"
        "print(json.dumps({'bad': bad, 'heavy': heavy}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"bad": [], "heavy": []}


def test_verify_with_reference_runtime(exported) -> None:
    import exporter

    report = exporter.verify(_path(exported, "mlp", "flax"), runtime="reference")
    assert report and report.candidate == "reference"


def test_tampered_onnx_fails_integrity(exported, tmp_path: Path) -> None:
    import exporter

    d = tmp_path / "b"
    shutil.copytree(_path(exported, "mlp", "torch"), d)
    m = onnx.load(str(d / "model.onnx"))
    m.doc_string = "edited"  # same numbers, different bytes
    onnx.save(m, str(d / "model.onnx"))
    report = exporter.verify(d)
    assert not report
    assert any("integrity" in line and "sha256" in line for line in report.failures())
    assert exporter.verify(d, check_hashes=False)


def test_interrupted_export_leaves_no_half_bundle(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export raises midway (after state and a partial model.onnx were written)."""
    import exporter
    from exporter import onnx_export

    out = tmp_path / "out"
    old = out / "mlp" / "torch"
    shutil.copytree(_path(exported, "mlp", "torch"), old)  # a previous, complete bundle
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}

    def crash(spec, framework, built, path, **kw):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt("simulated crash during export")

    monkeypatch.setattr(onnx_export, "export_model", crash)
    with pytest.raises(KeyboardInterrupt):
        exporter.export("mlp", framework="torch", out=out)
    with pytest.raises(KeyboardInterrupt):
        exporter.export("mlp", framework="torch", out=tmp_path / "fresh")
    # the previous bundle is untouched; no new half bundle; no temp leftovers
    after = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    assert after == before
    assert not (tmp_path / "fresh" / "mlp" / "torch").exists()
    for parent in (out / "mlp", tmp_path / "fresh" / "mlp"):
        assert not [p.name for p in parent.iterdir() if p.name.startswith(".tmp-")]


def test_test_data_round_trip(tmp_path: Path) -> None:
    inputs = {"input_ids": np.arange(6, dtype=np.int64).reshape(2, 3), "mask": np.ones((2, 3), np.float32)}
    outputs = {"y": np.linspace(-1, 1, 4, dtype=np.float32)}
    testdata.write_test_data(tmp_path / "test_data_set_0", inputs, outputs)
    got_in, got_out = testdata.read_test_data(tmp_path / "test_data_set_0")
    assert list(got_in) == ["input_ids", "mask"] and list(got_out) == ["y"]
    for a, b in ((inputs, got_in), (outputs, got_out)):
        for k in a:
            assert a[k].dtype == b[k].dtype
            np.testing.assert_array_equal(a[k], b[k])


def test_verify_bad_bundles(exported, tmp_path: Path) -> None:
    import exporter

    with pytest.raises(BundleError, match="does not exist"):
        exporter.verify(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="holds no exporter bundle"):
        exporter.verify(tmp_path / "empty")
    d = tmp_path / "b"
    shutil.copytree(_path(exported, "mlp", "torch"), d)
    shutil.rmtree(d / "test_data_set_2")
    with pytest.raises(BundleError, match="test_data_set_2 is missing"):
        exporter.verify(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot be read as JSON"):
        exporter.verify(d)
    (d / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BundleError, match="not an exporter bundle"):
        exporter.verify(d)
    (d / "manifest.json").unlink()
    with pytest.raises(BundleError, match="holds no exporter bundle"):
        exporter.verify(d)
    with pytest.raises(BundleError, match="manifest.json is missing"):
        bundle.read_manifest(d)
    # a bad .pb, and malformed recorded tolerances, in an otherwise complete bundle
    e = tmp_path / "c"
    shutil.copytree(_path(exported, "mlp", "torch"), e)
    (e / "test_data_set_1" / "output_0.pb").write_bytes(b"\xff\xff not a tensor")
    with pytest.raises(BundleError, match="output_0.pb is not a valid ONNX TensorProto"):
        exporter.verify(e)
    manifest = json.loads((e / "manifest.json").read_text())
    manifest["tolerances"]["per_output"]["y"] = {"atol": "loose"}
    (e / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"tolerances.per_output.y"):
        exporter.verify(e)


def test_find_bundles_expands_an_out_directory(exported) -> None:
    found = bundle.find_bundles(exported.out)
    assert {(p.parent.name, p.name) for p in found} == set(PAIRS)


@pytest.mark.parametrize("model", MODELS)
def test_seeded_state_is_the_same_file_in_both_bundles(exported, model: str) -> None:
    """One seeded state per model: each bundle holds its own copy of the same bytes."""
    from exporter.hashing import sha256_file

    files = [_path(exported, model, fw) / "state.safetensors" for fw in registry.get(model).frameworks]
    assert len({f.read_bytes() for f in files}) == 1
    for f in files:
        assert f.stat().st_nlink == 1  # a copy, not a link: editing one bundle cannot change another
        manifest = json.loads((f.parent / "manifest.json").read_text())
        assert manifest["checkpoint"]["seeded"] is True and manifest["checkpoint"]["sha256"] == sha256_file(f)
    assert not [p for p in (exported.out / model).iterdir() if p.name.startswith(".tmp-")]  # no scratch left
