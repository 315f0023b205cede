"""Variants (optimized, fp16, int8) of every registry export, judged against the ORIGINAL
framework's outputs (the bundle's test data), never against the float32 ONNX.

Every registry model x framework x variant is a case; a variant a model cannot take is
skipped *with its reason* in the result (checked on crafted graphs below).  Outcomes are
the measured ones on the seeded states (onnxruntime 1.32): where a variant fails, the test
pins why, so a change of verdict is seen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import skip_unless_ci

from exporter import variants
from exporter.errors import MissingDependencyError, UsageError
from exporter.models import registry
from exporter.testdata import read_test_data
from exporter.variants import fp16, int8, optimized

FRAMEWORKS = ("torch", "flax")

# (model, framework, variant) -> (status, a fragment every failure listing must contain).
# Everything not listed passes.
EXPECTED_FAILURES: dict[tuple[str, str, str], str] = {
    # onnxruntime 1.32's NchwcTransformer segfaults creating a session (level 'all') for
    # the fp16 graph of nn.MultiheadAttention's torch export; the probe turns it into a verdict.
    ("transformer", "torch", "fp16"): "crashes (SIGSEGV)",
}
# minilm: 90 MB of weights, every variant takes 10 s .. minutes here; resnet: 11 M parameters,
# each variant's sweep takes seconds (its int8 bar is 0.95, see models/resnet.py).
SLOW_MODELS = {"minilm", "resnet"}


def _cases() -> list[Any]:
    out = []
    for name in registry.names():
        for fw in FRAMEWORKS:
            if fw not in registry.get(name).frameworks:
                continue
            for v in variants.names():
                marks = [pytest.mark.slow] if name in SLOW_MODELS else []
                out.append(pytest.param(name, fw, v, id=f"{name}-{fw}-{v}", marks=marks))
    return out


def _bundle_runs(bundle: Path) -> tuple[list[tuple[str, dict[str, int], dict[str, np.ndarray]]], list[dict[str, np.ndarray]]]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    runs, expected = [], []
    for s in manifest["test_data_sets"]:
        feed, out = read_test_data(bundle / s["dir"])
        runs.append((s["case"], dict(s["dims"]), feed))
        expected.append(out)
    return runs, expected


@pytest.fixture(scope="session")
def variant_results() -> dict[tuple[str, str, str], variants.VariantResult]:
    """Filled lazily: each (model, framework, variant) is made once per session."""
    return {}


def _result(exported, cache, tmp_root: Path, model: str, fw: str, v: str) -> variants.VariantResult:
    key = (model, fw, v)
    if key not in cache:
        bundle = exported.out / model / fw
        runs, expected = _bundle_runs(bundle)
        cache[key] = variants.apply(
            v, registry.get(model), bundle / "model.onnx", tmp_root / model / fw / v / "model.onnx",
            runs=runs, expected=expected, framework=fw,
        )  # fmt: skip
    return cache[key]


@pytest.fixture(scope="session")
def variant_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("variants")


@pytest.mark.parametrize("model,fw,variant", _cases())
def test_every_model_framework_variant(exported, variant_results, variant_root, model: str, fw: str, variant: str) -> None:
    r = _result(exported, variant_results, variant_root, model, fw, variant)
    assert (r.model, r.framework, r.variant) == (model, fw, variant)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))  # JSON-ready, no NaN
    assert d["variant"] == variant
    if r.status == "skipped":  # never silent: the reason is in the result
        assert r.reason and r.path is None
        return
    want = EXPECTED_FAILURES.get((model, fw, variant))
    if want is not None:
        assert r.status == "fail", r.headline()
        assert any(want in line for line in r.failures()), r.failures()
        return
    assert r.status == "pass", "\n".join(r.failures())
    assert r.path is not None and r.path.is_file()
    assert r.info is not None and r.info.tool_version
    # judged against the framework, on every case of the bundle's sweep
    assert r.parity is not None and r.parity.reference == fw
    n_cases = len(json.loads((exported.out / model / fw / "manifest.json").read_text())["test_data_sets"])
    assert len(r.parity.cases) == n_cases
    spec = registry.get(model)
    judged = {m.output for m in r.metrics.metrics}
    assert judged == set(spec.outputs), "every float output has a task metric"
    if variant == "optimized":
        assert r.parity.ok, "the optimizer must not change the numbers beyond float32 tolerance"
    if variant == "int8":
        details = r.info.details
        assert set(details["excluded"]) <= set(int8.candidates(_onnx(exported.out / model / fw / "model.onnx")))
        assert details["model_bytes"]["int8"] < details["model_bytes"]["fp32"]
        assert details["guard"]["met"]
    if variant == "fp16":
        assert r.info.details["finite"]


def _onnx(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False)


def test_mlp_int8_passes_its_own_bar_and_fails_the_default_honestly(exported, variant_results, variant_root, tmp_path: Path) -> None:
    """mlp's spec judges int8 top-1 at 0.95 (seeded near-tied logits, see models/mlp.py);
    at the default 0.99 the guard searches, finds no quantized model that meets it, and
    the verdict fails naming top1."""
    r = _result(exported, variant_results, variant_root, "mlp", "torch", "int8")
    assert r.status == "pass" and r.metrics.get("y", "top1").threshold == 0.95
    bundle = exported.out / "mlp" / "torch"
    runs, expected = _bundle_runs(bundle)
    r = variants.apply("int8", registry.get("mlp"), bundle / "model.onnx", tmp_path / "q.onnx", runs=runs,
                       expected=expected, framework="torch", thresholds={"y": {"top1": 0.99}})  # fmt: skip
    assert r.status == "fail" and any(line.startswith("metric y top1") for line in r.failures()), r.failures()
    d = r.info.details
    assert d["guard"]["enabled"] and not d["guard"]["met"]
    assert d["search"], "the guard searched before giving up"
    assert any("accuracy guard: no int8 model meets the thresholds" in w for w in r.info.warnings)
    assert d["gemm_as_matmul"] == 2 and d["quantized_nodes"] == 2  # Linear layers really are int8


def test_transformer_attention_not_fused_is_said(exported, variant_results, variant_root) -> None:
    r = _result(exported, variant_results, variant_root, "transformer", "torch", "optimized")
    assert r.info.details["path"] == "bert" and r.info.details["attention_blocks"] == 1
    assert r.info.details["fusions"].get("Attention", 0) == 0
    assert any("fused 0 Attention" in w for w in r.info.warnings), r.info.warnings


def test_reference_is_the_framework_not_the_onnx(exported, tmp_path: Path) -> None:
    """Shift the framework's outputs by 1e-3: the optimized variant, numerically the
    float32 ONNX, must now fail against them -- so they are what it is judged on."""
    bundle = exported.out / "mlp" / "torch"
    runs, expected = _bundle_runs(bundle)
    shifted = [{k: v + np.float32(1e-3) for k, v in e.items()} for e in expected]
    r = variants.apply("optimized", registry.get("mlp"), bundle / "model.onnx", tmp_path / "o.onnx", runs=runs, expected=shifted, framework="torch")
    assert r.status == "fail" and any("elementwise y @" in line for line in r.failures())


# --------------------------------------------------------------------------- negative control
def test_badly_calibrated_int8_fails_naming_the_metric(exported, tmp_path: Path) -> None:
    """Static QDQ calibrated on constant inputs (a broken calibration), guard off: the
    activation ranges are wrong and the classifier's top-k agreement collapses (measured:
    top5 0.64) -- the verdict fails and names the metric."""
    bundle = exported.out / "cnn" / "torch"
    runs, expected = _bundle_runs(bundle)
    garbage = [{"x": np.zeros_like(feed["x"])} for _l, _d, feed in runs[:2]]
    r = variants.apply(
        "int8", registry.get("cnn"), bundle / "model.onnx", tmp_path / "bad.onnx", runs=runs, expected=expected,
        framework="torch", options={"mode": "static", "guard": False}, calibration=garbage,
    )  # fmt: skip
    assert r.status == "fail"
    assert any(line.startswith(("metric y top1", "metric y top5")) for line in r.failures()), r.failures()
    assert not r.elementwise_decides  # the metric, not an elementwise tolerance, decided


def test_unknown_variant_and_options() -> None:
    with pytest.raises(UsageError, match=r"unknown variant\(s\) 'int4'"):
        variants.parse("optimized,int4")
    assert variants.parse("int8, optimized,int8") == ["int8", "optimized"]
    assert variants.parse(None) == []
    with pytest.raises(UsageError, match="unknown option"):
        int8.transform("x.onnx", "y.onnx", calibration=[], options={"bits": 4})


# --------------------------------------------------------------------------- crafted graphs
def _graph(nodes, inputs, outputs, inits=()) -> Any:
    from onnx import helper

    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_variant_a_model_cannot_take_is_skipped_with_its_reason(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 20])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 20])
    src = tmp_path / "relu.onnx"
    onnx.save(_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y]), str(src))
    spec = registry.get("mlp")
    feed = {"x": np.ones((2, 20), np.float32)}
    r = variants.apply("int8", spec, src, tmp_path / "q.onnx", runs=[("batch=2", {"batch": 2}, feed)], expected=[{"y": feed["x"]}], framework="torch")
    assert r.status == "skipped" and r.ok and "nothing to quantize" in r.reason
    assert "SKIPPED" in r.headline() and r.to_dict()["reason"] == r.reason
    ints = _graph(
        [helper.make_node("Identity", ["i"], ["o"])],
        [helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("o", TensorProto.INT64, [2])],
    )
    assert "nothing to convert" in fp16.applies(None, ints)
    assert optimized.applies(None, ints) is None


def test_fp16_overflow_nodes_are_blocked_automatically(tmp_path: Path) -> None:
    """(300 x)^2 overflows float16 (max 65504) for x > 0.853: the square and what reads it
    must stay float32; the block list is found and recorded, and the output is exact."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [
        helper.make_node("Mul", ["x", "c300"], ["a"], name="scale"),
        helper.make_node("Mul", ["a", "a"], ["b"], name="square"),
        helper.make_node("Div", ["b", "c5e4"], ["y"], name="shrink"),
    ]
    inits = [numpy_helper.from_array(np.array(300, np.float32), "c300"), numpy_helper.from_array(np.array(5e4, np.float32), "c5e4")]
    src = tmp_path / "ovf.onnx"
    onnx.save(_graph(nodes, [x], [y], inits), str(src))
    feed = {"x": np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)}
    info = fp16.transform(src, tmp_path / "ovf16.onnx", calibration=[feed], options={"measure_latency": False})
    assert info.details["finite"]
    assert "square" in info.details["node_block_list"]
    assert info.details["rounds"][0]["overflow_nodes"] == ["square"]
    got = ort.InferenceSession(str(tmp_path / "ovf16.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, (feed["x"].astype(np.float64) * 300) ** 2 / 5e4, rtol=1e-6)
    # Without blocking, the fp16 value of the square is inf.  It is read as a graph output:
    # onnxruntime's CPU provider, lacking fp16 kernels for Mul/Div, computes a chain of
    # them in float32 and never stores the intermediate in fp16 -- a GPU's fp16 kernels do.
    plain = fp16._convert(onnx.load(str(src)), fp16.DEFAULT_OPTIONS, [], [])
    exposed, names = fp16._all_outputs(plain)
    assert "b" in names
    (values,) = fp16._run_all(exposed, [feed])
    assert not np.isfinite(values["b"]).all()


def test_gemm_to_matmul_is_exact() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    m = _graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], [x], [y],
               [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])  # fmt: skip
    assert int8.gemm_to_matmul(m) == 1
    assert [n.op_type for n in m.graph.node] == ["MatMul", "Add"] and m.graph.node[0].name == "fc"
    onnx.checker.check_model(m)
    feed = {"x": rng.normal(size=(4, 5)).astype(np.float32)}
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, feed["x"] @ w.T + b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- real MiniLM
@pytest.fixture(scope="session")
def real_minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import exporter
    from exporter.models import minilm

    try:
        ckpt = minilm.checkpoint_path()
    except MissingDependencyError as e:
        skip_unless_ci(f"real checkpoint not installed: {e}")
    out = tmp_path_factory.mktemp("real_minilm")
    report = exporter.export("minilm", checkpoint=ckpt, framework="torch", out=out, intra_op_threads=1)
    assert report, report.failures()
    return out / "minilm" / "torch"


@pytest.mark.slow
def test_real_minilm_int8_guard_meets_the_bar(real_minilm: Path, tmp_path: Path) -> None:
    """The collapse the issue measured (quantize_dynamic: embedding cosine down to ~0.9)
    is caught, and the guard keeps the few most harmful nodes in float until cosine
    min >= 0.99 -- a smaller and faster model that still passes."""
    runs, expected = _bundle_runs(real_minilm)
    r = variants.apply("int8", registry.get("minilm"), real_minilm / "model.onnx", tmp_path / "int8.onnx",
                       runs=runs, expected=expected, framework="torch")  # fmt: skip
    d = r.info.details
    assert not d["unguarded_metrics"]["ok"] and any("sentence_embedding cosine_min" in f for f in d["unguarded_metrics"]["failures"])
    assert r.status == "pass", r.failures()
    assert d["guard"]["met"] and 0 < len(d["excluded"]) < d["candidates"] // 2
    assert r.metrics.get("sentence_embedding", "cosine_min").value >= 0.99
    assert d["model_bytes"]["ratio"] < 0.4
    assert d["latency_ms"]["ratio"] < 0.8, d["latency_ms"]


@pytest.mark.slow
def test_real_minilm_optimized_says_attention_was_not_fused(real_minilm: Path, tmp_path: Path) -> None:
    runs, expected = _bundle_runs(real_minilm)
    r = variants.apply("optimized", registry.get("minilm"), real_minilm / "model.onnx", tmp_path / "opt.onnx",
                       runs=runs, expected=expected, framework="torch")  # fmt: skip
    assert r.status == "pass", r.failures()
    f = r.info.details["fusions"]
    assert f.get("SkipLayerNormalization") == 12 and f.get("BiasGelu") == 6 and f.get("Attention", 0) == 0
    assert r.info.details["attention_blocks"] == 6
    assert any("fused 0 Attention" in w for w in r.info.warnings)
    ops = {n.domain for n in _onnx(tmp_path / "opt.onnx").graph.node}
    assert "com.microsoft" in ops  # contrib operators: onnxruntime only


@pytest.mark.slow
def test_real_minilm_garbage_calibration_fails_on_cosine(real_minilm: Path, tmp_path: Path) -> None:
    runs, expected = _bundle_runs(real_minilm)
    garbage = [{"input_ids": np.full((2, 16), 101, np.int64), "attention_mask": np.ones((2, 16), np.int64)}]
    r = variants.apply(
        "int8", registry.get("minilm"), real_minilm / "model.onnx", tmp_path / "bad.onnx", runs=runs, expected=expected,
        framework="torch", options={"mode": "static", "guard": False, "measure_latency": False}, calibration=garbage,
    )  # fmt: skip
    assert r.status == "fail"
    assert any(line.startswith("metric sentence_embedding cosine_min") for line in r.failures()), r.failures()


# --------------------------------------------------------------------------- export --variants, verify
@pytest.fixture(scope="session")
def exported_variants(tmp_path_factory: pytest.TempPathFactory):
    import exporter

    out = tmp_path_factory.mktemp("with_variants")
    return exporter.export("cnn", framework="torch", out=out, batch_sizes=(1, 7), variants="optimized,fp16,int8", intra_op_threads=1)


def test_export_writes_one_bundle_per_variant(exported_variants) -> None:
    from exporter.api import ExportReport

    report = exported_variants
    assert report.ok, report.failures()
    d = json.loads(report.to_json())
    assert [(r["model"], r["framework"], r["variant"]) for r in d["results"]] == [
        ("cnn", "torch", "fp32"), ("cnn", "torch", "optimized"), ("cnn", "torch", "fp16"), ("cnn", "torch", "int8"),
    ]  # fmt: skip
    assert ExportReport.from_dict(d).to_dict() == d  # read back, variants included
    assert "variants: 3 passed, 0 failed, 0 skipped" in report.summary()
    fp32 = report.out / "cnn" / "torch"
    assert json.loads((fp32 / "manifest.json").read_text())["variant"] == "fp32"
    for v in ("optimized", "fp16", "int8"):
        b = report.out / "cnn" / f"torch-{v}"
        m = json.loads((b / "manifest.json").read_text())
        assert m["variant"] == v and m["verdict"] == "pass" and m["source_bundle"] == "torch"
        assert m["variant_info"]["tool_version"] and m["variant_info"]["options"]
        assert m["metrics"]["kinds"] == {"y": "logits"} and m["metrics"]["report"]["ok"]
        p = json.loads((b / "parity.json").read_text())
        assert p["variant"] == v and p["metrics"]["metrics"] and p["reference"] == "torch"
        # the same test data as the plain bundle: the framework's outputs
        for s in m["test_data_sets"]:
            for f in (fp32 / s["dir"]).iterdir():
                assert (b / s["dir"] / f.name).read_bytes() == f.read_bytes()
    assert json.loads((report.out / "cnn" / "torch-int8" / "manifest.json").read_text())["elementwise_decides"] is False


@pytest.mark.parametrize("variant", ["optimized", "fp16", "int8"])
def test_verify_a_variant_bundle_recomputes_its_metrics(exported_variants, variant: str) -> None:
    import exporter

    rep = exporter.verify(exported_variants.out / "cnn" / f"torch-{variant}", intra_op_threads=1)
    assert rep.ok, rep.failures()
    assert {c.case for c in rep.checks} >= {"metric top1", "metric top5"}
    elementwise = [c for c in rep.checks if not c.case.startswith("metric")]
    assert bool(elementwise) == (variant != "int8")  # int8: the task metrics decide


def test_verify_fails_a_variant_on_its_metric(exported_variants, tmp_path: Path) -> None:
    """Judge the int8 bundle's output as an embedding that must be exact: verify recomputes
    the metric from the runtime's outputs and fails naming it."""
    import shutil

    import exporter

    b = tmp_path / "torch-int8"
    shutil.copytree(exported_variants.out / "cnn" / "torch-int8", b)
    m = json.loads((b / "manifest.json").read_text())
    m["metrics"]["kinds"] = {"y": "embedding"}
    m["metrics"]["thresholds"] = {"y": {"cosine_min": 1.0}}
    (b / "manifest.json").write_text(json.dumps(m))
    rep = exporter.verify(b)
    assert not rep.ok
    assert any("y cosine_min" in line and "< 1" in line for line in rep.failures()), rep.failures()


def test_reference_runtime_names_the_contrib_operators(exported_variants) -> None:
    import exporter
    from exporter.errors import RunError

    with pytest.raises(RunError, match=r"outside the ONNX standard") as e:
        exporter.verify(exported_variants.out / "cnn" / "torch-optimized", runtime="reference")
    assert any(p.startswith("operator com.microsoft.") for p in e.value.problems), e.value.problems
    # int8 and fp16 are standard operators: the reference evaluator judges them too
    for v in ("int8", "fp16"):
        rep = exporter.verify(exported_variants.out / "cnn" / f"torch-{v}", runtime="reference")
        assert rep.ok, rep.failures()


def test_cli_variants_flags(tmp_path: Path, capsys) -> None:
    from exporter.cli import main

    code = main(["export", "mlp", "--framework", "torch", "--out", str(tmp_path), "--variants", "optimized,int4"])
    assert code == 2 and "unknown variant(s) 'int4'" in capsys.readouterr().err
    code = main(["export", "mlp", "--framework", "torch", "--out", str(tmp_path), "--int8-mode", "static"])
    assert code == 2 and "not requested" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # validated before anything was written
    code = main(["export", "cnn", "--framework", "torch", "--out", str(tmp_path), "--batch-sizes", "1,7", "--variants", "int8"])
    text = capsys.readouterr().out
    assert code == 0 and "cnn (torch, int8): PASS" in text and "task metrics (int8): PASS" in text, text
