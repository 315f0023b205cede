"""The ``node`` runtime: onnxruntime-node driven from Python, and the JS program's own verify.

Uses a tiny hand-built ONNX model (no torch/jax needed) and bundle-shaped directories made
here with ``onnx.numpy_helper``.  Needs Node.js and ``runtimes/js/node_modules``
(``cd runtimes/js && npm ci --ignore-scripts``); without them the tests that run node
skip with that command as the reason, while the missing-dependency tests always run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import by_model, skip_unless_ci
from onnx import TensorProto, helper, numpy_helper

from exporter.errors import MissingDependencyError, RunError, UsageError
from exporter.runtimes import node as node_rt

W = np.arange(6, dtype=np.float32).reshape(3, 2) / 7.0
B = np.array([0.25, -0.5], dtype=np.float32)
BATCHES = (1, 2, 7)


@pytest.fixture(scope="module")
def node_ok() -> dict[str, str]:
    try:
        return node_rt.check_available()
    except MissingDependencyError as e:
        skip_unless_ci(f"node runtime not installed: {e}")


def _tiny_model(path: Path) -> Path:
    """y = x @ W + b (float32, dynamic batch); z = ids * 2 (int64)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["y"]),
        helper.make_node("Mul", ["ids", "two"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("z", TensorProto.INT64, ["batch"]),
        ],
        initializer=[
            numpy_helper.from_array(W, "W"),
            numpy_helper.from_array(B, "B"),
            numpy_helper.from_array(np.array(2, dtype=np.int64), "two"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def _inputs(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {
        "x": rng.standard_normal((batch, 3)).astype(np.float32),
        "ids": rng.integers(-1000, 1000, size=batch, dtype=np.int64),
    }


def _expected(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x64 = feed["x"].astype(np.float64)
    return {"y": (x64 @ W.astype(np.float64) + B).astype(np.float32), "z": feed["ids"] * 2}


def _write_set(directory: Path, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, arrays in (("input", inputs), ("output", outputs)):
        for i, (name, value) in enumerate(arrays.items()):
            (directory / f"{prefix}_{i}.pb").write_bytes(numpy_helper.from_array(value, name=name).SerializeToString())


def _bundle(root: Path, *, atol: float = 1e-5, rtol: float = 1e-4) -> Path:
    """A bundle-shaped directory (the contract's layout) around the tiny model."""
    model = _tiny_model(root / "model.onnx")
    sets = []
    for k, b in enumerate(BATCHES):
        feed = _inputs(b)
        _write_set(root / f"test_data_set_{k}", feed, _expected(feed))
        sets.append({"dir": f"test_data_set_{k}", "case": f"batch={b}", "dims": {"batch": b}})
    from exporter.bundle import sha256_file

    manifest = {
        "format": "exporter-bundle",
        "format_version": 1,
        "model": "tiny",
        "framework": "torch",
        "onnx": {"file": "model.onnx", "sha256": sha256_file(model), "external_data": None},
        "tolerances": {
            "defaults": {"float32": {"atol": atol, "rtol": rtol}},
            "per_output": {"y": {"atol": atol, "rtol": rtol}},
        },
        "test_data_sets": sets,
        "seed": 0,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return root


def _perturb(bundle: Path, k: int, output: str, delta: float) -> None:
    """Add ``delta`` to element 0 of one stored expected output."""
    d = bundle / f"test_data_set_{k}"
    for f in sorted(d.glob("output_*.pb")):
        t = TensorProto.FromString(f.read_bytes())
        if t.name == output:
            a = numpy_helper.to_array(t).copy()
            a.flat[0] += delta
            f.write_bytes(numpy_helper.from_array(a, name=output).SerializeToString())
            return
    raise AssertionError(f"no output {output} in {d}")


def _js(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    node = node_rt.find_node()
    return subprocess.run(
        [node, str(node_rt.SCRIPT), *args], capture_output=True, text=True, cwd=str(node_rt.NODE_DIR), timeout=300, **kw
    )


# --------------------------------------------------------------------------- runtime
def test_node_runtime_matches_onnxruntime(node_ok: dict[str, str], tmp_path: Path) -> None:
    from exporter.runtimes.onnxruntime import OnnxRuntime

    path = _tiny_model(tmp_path / "model.onnx")
    with node_rt.NodeRuntime(path) as rt, OnnxRuntime(path) as ref:
        assert [i.name for i in rt.inputs] == ["x", "ids"]
        assert rt.outputs == ("y", "z")
        assert rt.runtime_versions["onnxruntime-node"] == node_rt.PACKAGE_VERSION
        for b in BATCHES:  # one node process serves every run
            feed = _inputs(b)
            got, want = rt.run(feed), ref.run(feed)
            assert list(got) == ["y", "z"]
            assert got["y"].dtype == np.float32 and got["z"].dtype == np.int64
            np.testing.assert_array_equal(got["y"], want["y"])  # same onnxruntime kernels
            np.testing.assert_array_equal(got["z"], want["z"])
    rt.close()  # closing twice is fine


def test_load_runtime_by_name(node_ok: dict[str, str], tmp_path: Path) -> None:
    from exporter.runtimes.base import load_runtime

    rt = load_runtime("node", str(_tiny_model(tmp_path / "model.onnx")), intra_op_threads=1)
    try:
        assert isinstance(rt, node_rt.NodeRuntime) and rt.name == "node"
        assert rt.run(_inputs(2))["y"].shape == (2, 2)
    finally:
        rt.close()


def test_bad_inputs_are_caught_before_node(node_ok: dict[str, str], tmp_path: Path) -> None:
    with node_rt.NodeRuntime(_tiny_model(tmp_path / "model.onnx")) as rt:
        feed = _inputs(2)
        with pytest.raises(UsageError, match="dtype float64, expected float32"):
            rt.run({"x": feed["x"].astype(np.float64), "ids": feed["ids"]})
        with pytest.raises(UsageError, match="missing input 'ids'"):
            rt.run({"x": feed["x"]})
        assert rt.run(feed)["z"].tolist() == (feed["ids"] * 2).tolist()  # still alive


def test_model_node_cannot_load(node_ok: dict[str, str], tmp_path: Path) -> None:
    model = onnx.load(_tiny_model(tmp_path / "ok.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    with pytest.raises(RunError, match="cannot load"):
        node_rt.NodeRuntime(bad)


# --------------------------------------------------------------------------- TensorProto codec
ROUNDTRIP = {
    "f32": np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4),
    "f64": np.array([[np.pi, -np.e], [np.inf, np.nan]]),
    "f16": np.array([0.5, -1.25, 65504, 6e-8], dtype=np.float16),
    "i64": np.array([-(2**62), -1, 0, 2**62], dtype=np.int64),
    "i32": np.array([[-(2**31), 2**31 - 1]], dtype=np.int32),
    "i8": np.array([-128, 127], dtype=np.int8),
    "u8": np.arange(5, dtype=np.uint8),
    "u64": np.array([2**64 - 1, 0], dtype=np.uint64),
    "b": np.array([[True, False, True]]),
    "scalar": np.array(1.5, dtype=np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
}


def test_tensorproto_roundtrip(node_ok: dict[str, str], tmp_path: Path) -> None:
    src, dst = tmp_path / "in", tmp_path / "out"
    _write_set(src, ROUNDTRIP, {})
    script = (
        "const fs=require('fs'),path=require('path'),tp=require('./tensorproto');"
        "const [src,dst]=process.argv.slice(1);fs.mkdirSync(dst);"
        "for(const f of fs.readdirSync(src)){const t=tp.decode(fs.readFileSync(path.join(src,f)),f);"
        "fs.writeFileSync(path.join(dst,f),tp.encode(t.name,t.type,t.dims,t.data));}"
    )
    proc = subprocess.run(
        [node_rt.find_node(), "-e", script, str(src), str(dst)], capture_output=True, text=True, cwd=str(node_rt.NODE_DIR)
    )
    assert proc.returncode == 0, proc.stderr
    for i, (name, want) in enumerate(ROUNDTRIP.items()):
        t = TensorProto.FromString((dst / f"input_{i}.pb").read_bytes())
        got = numpy_helper.to_array(t)
        assert t.name == name
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        (helper.make_tensor("x", TensorProto.FLOAT, [2], [1.0, 2.0]), "float_data"),
        (helper.make_tensor("x", TensorProto.INT64, [2], [1, 2]), "int64_data"),
        (helper.make_tensor("x", TensorProto.BFLOAT16, [1], b"\x00\x00", raw=True), "BFLOAT16 is not supported"),
        (helper.make_tensor("x", TensorProto.STRING, [1], [b"a"]), "string_data"),
    ],
    ids=["float_data", "int64_data", "bfloat16", "string"],
)
def test_tensorproto_rejects_what_it_cannot_read(
    node_ok: dict[str, str], tmp_path: Path, tensor: TensorProto, fragment: str
) -> None:
    model = _tiny_model(tmp_path / "model.onnx")
    d = tmp_path / "in"
    d.mkdir()
    (d / "input_0.pb").write_bytes(tensor.SerializeToString())
    proc = _js(["run", str(model), str(d), str(tmp_path / "out")])
    assert proc.returncode == 2
    assert fragment in proc.stderr and "input_0.pb" in proc.stderr


def test_tensorproto_rejects_truncated_and_wrong_length(node_ok: dict[str, str], tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "model.onnx")
    good = numpy_helper.from_array(np.ones((2, 3), np.float32), "x").SerializeToString()
    for payload, fragment in ((good[:-5], "truncated raw_data"), (good[:3], "truncated dims")):
        d = tmp_path / f"in{len(payload)}"
        d.mkdir()
        (d / "input_0.pb").write_bytes(payload)
        proc = _js(["run", str(model), str(d), str(tmp_path / "out")])
        assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
    t = numpy_helper.from_array(np.ones((2, 3), np.float32), "x")
    t.dims[1] = 4  # raw_data no longer matches the dims
    d = tmp_path / "inlen"
    d.mkdir()
    (d / "input_0.pb").write_bytes(t.SerializeToString())
    proc = _js(["run", str(model), str(d), str(tmp_path / "out")])
    assert proc.returncode == 2 and "expected 32" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- the JS program's verify
def test_js_verify_passes_and_reports_json(node_ok: dict[str, str], tmp_path: Path) -> None:
    from exporter.parity import ParityReport

    bundle = _bundle(tmp_path / "tiny" / "torch")
    code, report = node_rt.node_verify(bundle, dump=tmp_path / "dump")
    assert code == 0, report
    assert report["ok"] is True and report["candidate"] == "node"
    assert report["cases"] == [f"batch={b}" for b in BATCHES]
    parsed = ParityReport.from_dict(report)  # the same schema as parity.json
    assert parsed.ok and len(parsed.checks) == 2 * len(BATCHES)
    y = next(c for c in parsed.checks if c.output == "y" and c.case == "batch=7")
    assert y.dims == {"batch": 7} and y.atol == 1e-5 and y.max_abs is not None and y.max_abs < 1e-6
    z = next(c for c in parsed.checks if c.output == "z")
    assert z.atol == 0 and z.rtol == 0 and z.max_abs == 0  # integers are exact
    # --dump: Node's raw outputs, readable by numpy_helper, equal to the expected ones here
    for k, b in enumerate(BATCHES):
        got = {
            (t := TensorProto.FromString(f.read_bytes())).name: numpy_helper.to_array(t)
            for f in sorted((tmp_path / "dump" / f"test_data_set_{k}").glob("output_*.pb"))
        }
        want = _expected(_inputs(b))
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got["z"], want["z"])


def test_js_verify_fails_on_a_perturbed_output(node_ok: dict[str, str], tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b")
    _perturb(bundle, 2, "y", 1e-3)  # 1e-3 > atol 1e-5 + rtol 1e-4 * |y|
    _perturb(bundle, 0, "z", 1)  # integers are exact: an off-by-one fails
    code, report = node_rt.node_verify(bundle)
    assert code == 1 and report["ok"] is False
    assert len(report["failures"]) == 2
    assert report["failures"][0].startswith("y @ batch=7: max_abs 0.001")
    assert "1/14 elements out of tolerance" in report["failures"][0]
    assert report["failures"][1].startswith("z @ batch=1:")
    # the same bundle passes once the tolerance covers the change (--atol/--rtol override)
    code, report = node_rt.node_verify(bundle, atol=2e-3)
    assert code == 1 and [f.split(":")[0] for f in report["failures"]] == ["z @ batch=1"]


def test_js_verify_nan_and_hash_mismatch(node_ok: dict[str, str], tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b")
    _perturb(bundle, 1, "y", np.nan)
    code, report = node_rt.node_verify(bundle, atol=1.0, rtol=1.0)  # no tolerance excuses a NaN
    assert code == 1
    y = next(c for c in report["checks"] if c["output"] == "y" and c["case"] == "batch=2")
    assert y["nan_mismatch"] == 1 and not y["ok"]

    bundle = _bundle(tmp_path / "c")
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    manifest["onnx"]["sha256"] = "0" * 64  # the model no longer matches its manifest
    (bundle / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    code, report = node_rt.node_verify(bundle)
    assert code == 1
    assert [c["output"] for c in report["checks"] if not c["ok"]] == ["model.onnx"]
    assert "differs from the manifest" in report["failures"][0]
    assert node_rt.node_verify(bundle, check_hashes=False)[0] == 0


def test_js_verify_run_failure_is_a_parity_failure(node_ok: dict[str, str], tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b")
    d = bundle / "test_data_set_1"
    (d / "input_0.pb").write_bytes(numpy_helper.from_array(np.ones((2, 5), np.float32), "x").SerializeToString())
    code, report = node_rt.node_verify(bundle)
    assert code == 1
    bad = [c for c in report["checks"] if not c["ok"]]
    assert {c["output"] for c in bad} == {"y", "z"}
    assert all(c["case"] == "batch=2" and "node failed to run" in c["reason"] for c in bad)


def test_js_verify_bad_usage_exits_2(node_ok: dict[str, str], tmp_path: Path) -> None:
    code, report = node_rt.node_verify(tmp_path / "nope")
    assert code == 2 and "is not a directory" in report["error"]
    bundle = _bundle(tmp_path / "b")
    shutil.rmtree(bundle / "test_data_set_1")
    code, report = node_rt.node_verify(bundle)
    assert code == 2 and "test_data_set_1 is missing" in report["error"]
    proc = _js(["frobnicate"])
    assert proc.returncode == 2 and "usage" in proc.stderr


# --------------------------------------------------------------------------- Python verify (same rules as the other runtimes)
def test_python_verify_with_node_runtime(node_ok: dict[str, str], tmp_path: Path) -> None:
    from exporter import bundle as bundle_mod

    bundle = _bundle(tmp_path / "b")
    report = bundle_mod.verify(bundle, runtime="node")
    assert report.ok and report.candidate == "node", report.failures()
    onnxrt = bundle_mod.verify(bundle, runtime="onnxruntime")
    for a, b in zip(report.checks, onnxrt.checks):  # identical numbers to onnxruntime's
        assert (a.output, a.case, a.max_abs, a.n_bad) == (b.output, b.case, b.max_abs, b.n_bad)
    _perturb(bundle, 2, "y", 1e-3)
    report = bundle_mod.verify(bundle, runtime="node")
    assert not report.ok
    assert [c.label for c in report.failed_checks()] == ["y @ batch=7"]


def test_cli_verify_runtime_node_exit_codes(node_ok: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exporter import cli

    bundle = _bundle(tmp_path / "b")
    assert cli.main(["verify", str(bundle), "--runtime", "node"]) == 0
    _perturb(bundle, 2, "y", 1e-3)
    assert cli.main(["verify", str(bundle), "--runtime", "node"]) == 1
    out = capsys.readouterr()
    assert "y @ batch=7" in out.out + out.err


# --------------------------------------------------------------------------- missing dependencies
def test_missing_node_names_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_model(tmp_path / "model.onnx")
    monkeypatch.delenv("EXPORTER_NODE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(MissingDependencyError, match="needs Node.js, but `node` is not on PATH"):
        node_rt.NodeRuntime(model)
    with pytest.raises(MissingDependencyError, match="install Node.js"):
        node_rt.node_verify(tmp_path)
    from exporter.runtimes.base import load_runtime

    with pytest.raises(MissingDependencyError, match="EXPORTER_NODE"):
        load_runtime("node", str(model))


def test_bad_exporter_node_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORTER_NODE", str(tmp_path / "no-such-node"))
    with pytest.raises(MissingDependencyError, match="is not an executable file"):
        node_rt.find_node()


def test_missing_npm_package_names_the_npm_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_model(tmp_path / "model.onnx")
    monkeypatch.setattr(node_rt, "NODE_DIR", tmp_path / "no-node-modules-here")
    monkeypatch.delenv("EXPORTER_NODE_MODULES", raising=False)
    monkeypatch.setattr(node_rt, "find_node", lambda: "/usr/bin/node")  # node itself is "there"
    with pytest.raises(MissingDependencyError, match=r"npm ci --ignore-scripts .*onnxruntime-node@1\.30\.0"):
        node_rt.NodeRuntime(model)


def test_missing_model_file_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        node_rt.NodeRuntime(tmp_path / "missing.onnx")


# --------------------------------------------------------------------------- every registry bundle
from exporter.models import registry  # noqa: E402

_PAIRS = [(m, fw) for m in registry.names() for fw in registry.get(m).frameworks]


@pytest.mark.parametrize(("model", "framework"), by_model(_PAIRS, lambda p: p[0], lambda p: f"{p[0]}-{p[1]}"))
def test_every_registry_bundle_verifies_in_node(node_ok: dict[str, str], exported, model: str, framework: str) -> None:
    """The real bundles of every registry entry (MiniLM included) pass in Node.js: both the
    JS program's own comparison and ``verify --runtime node`` (Python's comparison)."""
    from exporter import bundle as bundle_mod

    path = exported.out / model / framework
    code, report = node_rt.node_verify(path)
    assert code == 0, json.dumps(report)[:3000]
    py = bundle_mod.verify(path, runtime="node")
    assert py.ok and py.candidate == "node", py.failures()
    manifest = json.loads((path / "manifest.json").read_text())
    # a decoder's generation sets (exporter.generation) are replayed on top of the test data sets
    assert len({c.case for c in py.checks if not c.case.startswith("generation ")}) == len(manifest["test_data_sets"])
    assert len(manifest.get("generation", {}).get("sets", [])) == len({c.case for c in py.checks if c.case.startswith("generation ")})
