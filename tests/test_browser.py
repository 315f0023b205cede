"""The ``browser`` runtime: onnxruntime-web (WASM) in headless Chromium, judged in Python.

Needs Node.js, ``runtimes/js/node_modules`` (``npm ci --ignore-scripts``: onnxruntime-web,
playwright-core) and Chromium (``apt-get install -y chromium``); without them the tests
that open a browser skip with the install command (and fail under CI=true), while the
missing-dependency tests always run.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import skip_unless_ci
from onnx import TensorProto, helper, numpy_helper

from exporter import bundle, parity
from exporter.errors import MissingDependencyError, RunError, UsageError
from exporter.models import registry
from exporter.runtimes import browser as browser_rt

PAIRS = [(m, fw) for m in registry.names() for fw in registry.get(m).frameworks]
#: Each bundle takes a page start (~2 s) plus its cases (MiniLM ~25 s): all in the slow loop;
#: the fast loop verifies mlp/torch through the CLI (test_cli_verify_in_the_browser).
FAST: set[tuple[str, str]] = set()
W = np.arange(6, dtype=np.float32).reshape(3, 2) / 7.0


@pytest.fixture(scope="module")
def browser_ok() -> dict[str, str]:
    try:
        return browser_rt.check_available()
    except MissingDependencyError as e:
        skip_unless_ci(f"browser runtime not installed: {e}")


def _save(path: Path, nodes: list, inputs: list, outputs: list, initializer: list = ()) -> Path:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=list(initializer))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def _tiny_model(path: Path, *, reshape_to: int | None = None) -> Path:
    """y = x @ W (float32), z = ids * 2 (int64), neg = ids < 0 (bool); optionally y reshaped
    to a baked-in batch size."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw" if reshape_to else "y"]),
        helper.make_node("Mul", ["ids", "two"], ["z"]),
        helper.make_node("Less", ["ids", "zero"], ["neg"]),
    ]
    init = [
        numpy_helper.from_array(W, "W"),
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
    ]
    if reshape_to:
        nodes.append(helper.make_node("Reshape", ["xw", "shape"], ["y"]))
        init.append(numpy_helper.from_array(np.array([reshape_to, 2], np.int64), "shape"))
    return _save(
        path,
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("z", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("neg", TensorProto.BOOL, ["batch"]),
        ],
        init,
    )


def _feed(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"x": rng.standard_normal((batch, 3)).astype(np.float32), "ids": rng.integers(-1000, 1000, batch, dtype=np.int64)}


# --------------------------------------------------------------------------- the runtime
@pytest.fixture(scope="module")
def tiny(browser_ok: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """One page with the tiny model, shared by the tests that only run it."""
    path = _tiny_model(tmp_path_factory.mktemp("tiny") / "model.onnx")
    (path.parent / "secret.txt").write_text("not for the page", encoding="utf-8")
    with browser_rt.BrowserRuntime(path) as rt:
        yield rt


def test_browser_matches_onnxruntime(tiny: browser_rt.BrowserRuntime) -> None:
    from exporter.runtimes.onnxruntime import OnnxRuntime

    rt = tiny
    with OnnxRuntime(rt.path) as ref:
        assert rt.name == "browser" and rt.outputs == ("y", "z", "neg")
        assert rt.server_base().startswith("http://127.0.0.1:")  # local only
        s = rt.session_options()
        assert s["backend"] == "wasm" and s["threads"] == 1
        assert s["versions"]["onnxruntime-web"] == browser_rt.PACKAGES["onnxruntime-web"]
        assert s["versions"]["chromium"].split(".")[0].isdigit()
        for b in (1, 2, 7):  # one page serves every run
            feed = _feed(b)
            got, want = rt.run(feed), ref.run(feed)
            assert {k: v.dtype for k, v in got.items()} == {"y": np.float32, "z": np.int64, "neg": np.bool_}
            checks = parity.compare(want, got, parity.tolerance_for(None), case=f"batch={b}")
            assert all(checks), [c.line() for c in checks if not c]
            np.testing.assert_array_equal(got["z"], feed["ids"] * 2)
            np.testing.assert_array_equal(got["neg"], feed["ids"] < 0)
        assert rt.console_errors == []


ROUNDTRIP = {
    "f64": np.array([[np.pi, -np.e], [np.inf, np.nan]]),
    "f16": np.array([0.5, -1.25, 65504, 6e-8], dtype=np.float16),
    "i64": np.array([-(2**62), -1, 0, 2**62], dtype=np.int64),
    "i32": np.array([[-(2**31), 2**31 - 1]], dtype=np.int32),
    "i8": np.array([-128, 127], dtype=np.int8),
    "u8": np.arange(5, dtype=np.uint8),
    "b": np.array([[True, False, True]]),
    "scalar": np.array(1.5, dtype=np.float32),
}


def test_the_page_decodes_and_encodes_every_dtype(browser_ok: dict[str, str], tmp_path: Path) -> None:
    """tensorproto.js (the Node program's codec) in the page: Identity of each dtype (and a
    0-d tensor) round-trips bit for bit."""
    vi = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for k, v in ROUNDTRIP.items()]
    out = [helper.make_tensor_value_info(f"{k}_out", helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for k, v in ROUNDTRIP.items()]
    path = _save(tmp_path / "identity.onnx", [helper.make_node("Identity", [k], [f"{k}_out"]) for k in ROUNDTRIP], vi, out)
    with browser_rt.BrowserRuntime(path) as rt:
        got = rt.run(ROUNDTRIP)
    for k, want in ROUNDTRIP.items():
        g = got[f"{k}_out"]
        assert g.dtype == want.dtype and g.shape == want.shape, k
        np.testing.assert_array_equal(g, want)


def test_a_case_the_page_cannot_run_is_a_run_error(browser_ok: dict[str, str], tmp_path: Path) -> None:
    with browser_rt.BrowserRuntime(_tiny_model(tmp_path / "model.onnx", reshape_to=2)) as rt:
        assert rt.run(_feed(2))["y"].shape == (2, 2)
        with pytest.raises(RunError, match=r"runtime 'browser' \(.*model.onnx\): failed to run: onnxruntime-web: "):
            rt.run(_feed(3))
        assert rt.run(_feed(2))["y"].shape == (2, 2)  # the page is still usable


def test_a_model_the_page_cannot_load_is_a_run_error(browser_ok: dict[str, str], tmp_path: Path) -> None:
    model = onnx.load(_tiny_model(tmp_path / "ok.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    with pytest.raises(RunError, match="cannot load the model in onnxruntime-web"):
        browser_rt.BrowserRuntime(bad)


def test_the_server_serves_only_what_the_page_needs(tiny: browser_rt.BrowserRuntime) -> None:
    base_url = tiny.server_base()
    assert urllib.request.urlopen(base_url + "model/model.onnx").read() == Path(tiny.path).read_bytes()
    assert b"tensorproto" in urllib.request.urlopen(base_url + "lib/tensorproto.js").read()
    for bad in ("model/secret.txt", "model/../model/secret.txt", "lib/run_bundle.js", "page/", "page/../../base.py", "nope"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base_url + bad)
        assert e.value.code == 404, bad


# --------------------------------------------------------------------------- every registry bundle
@pytest.mark.parametrize(
    ("model", "framework"),
    [pytest.param(m, fw, marks=() if (m, fw) in FAST else pytest.mark.slow, id=f"{m}-{fw}") for m, fw in PAIRS],
)
def test_every_bundle_verifies_in_the_browser(browser_ok: dict[str, str], exported, model: str, framework: str) -> None:
    path = exported.out / model / framework
    report = bundle.verify(path, runtime="browser")
    assert report.candidate == "browser"
    sets = bundle.read_manifest(path)["test_data_sets"]
    assert {c.case for c in report.checks} >= {s["case"] for s in sets}
    assert len(report.checks) >= len(sets) * len(registry.get(model).outputs)
    assert report.ok, report.table()


# --------------------------------------------------------------------------- missing pieces
def test_missing_chromium_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXPORTER_CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(MissingDependencyError, match=r"needs Chromium.*apt-get install -y chromium"):
        browser_rt.find_chromium()
    monkeypatch.setenv("EXPORTER_CHROMIUM", str(tmp_path / "no-such-chrome"))
    with pytest.raises(MissingDependencyError, match="is not an executable file.*apt-get install -y chromium"):
        browser_rt.find_chromium()


def test_missing_npm_packages_name_the_npm_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("exporter.runtimes.node.NODE_DIR", tmp_path / "no-node-modules-here")
    monkeypatch.delenv("EXPORTER_NODE_MODULES", raising=False)
    monkeypatch.setattr("exporter.runtimes.node.find_node", lambda: "/usr/bin/node")
    with pytest.raises(MissingDependencyError, match=r"onnxruntime-web 1\.30\.0.*npm ci --ignore-scripts"):
        browser_rt.BrowserRuntime(_tiny_model(tmp_path / "model.onnx"))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        browser_rt.BrowserRuntime(tmp_path / "nope.onnx")
    with pytest.raises(UsageError, match="intra_op_threads must be a positive int"):
        browser_rt.BrowserRuntime(_tiny_model(tmp_path / "model.onnx"), intra_op_threads=0)


def test_cli_verify_in_the_browser(browser_ok: dict[str, str], exported, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from exporter.cli import main

    code = main(["verify", str(exported.out / "mlp" / "torch"), "--runtime", "browser", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["candidate"] == "browser"
    assert report["settings"]["backend"] == "wasm" and report["settings"]["versions"]["onnxruntime-web"] == "1.30.0"
