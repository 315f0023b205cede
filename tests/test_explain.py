"""explain: a defect injected into exactly one place of a bundle's ONNX graph is named first.

Per (registry model, framework) and per defect, on a copy of the shared bundle (the
``exported`` fixture; two of its test cases), the bundle's own files never edited:

* ``weight``: one initializer perturbed (minilm: layer 3's query projection; cnn: the
  second conv; ...), found by its values in the bundle's state, not by its name;
* ``swap``: one activation swapped (exact Gelu -> its tanh approximation in one layer;
  Relu -> LeakyRelu where there is no Gelu or where tanh-GELU stays within tolerance);
* ``fp16``: an activation scaled beyond float16's range and cast to float16 (the Cast
  overflows to Inf), then cast back and unscaled, inserted after the node that consumes
  that initializer;
* ``none``: no defect, no divergent module.

The report must name the expected module first (``EXPECTED``: what the model code says,
e.g. a functional gelu between two Linears is the second Linear's business) and list the
defect's node among that module's nodes; the fp16 defect must be reported as the first
node producing Inf.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import skip_unless_ci
from exporter import divergence as ex
from exporter import flax_scopes
from exporter.errors import StateMismatchError, UsageError
from exporter.models import registry

DEFECTS = ("none", "weight", "swap", "fp16")

#: model -> (canonical weight to perturb / put the fp16 overflow after, activation op to
#: swap ("Gelu": exact <-> tanh; "Relu": -> LeakyRelu; "A->B": op A becomes B), its index)
TARGETS: dict[str, tuple[str, str, int]] = {
    "mlp": ("hidden.weight", "Relu", 0),
    # tanh-GELU in cnn stays within tolerance (fc max_abs 3.5e-6): swap its ReLU instead
    "cnn": ("conv2.weight", "Relu", 0),
    "transformer": ("fc1.weight", "Gelu", 0),
    "minilm": ("encoder.layer.3.attention.self.query.weight", "Gelu", 3),
    "bert": ("encoder.layer.1.attention.self.query.weight", "Gelu", 1),
    # gpt2's GELU is the tanh one; exact GELU there stays within tolerance up to ln_f
    # (c_proj at 49% of it, growth x41, then ln_f x5): swap it for a ReLU instead
    "gpt2": ("transformer.h.1.mlp.c_fc.weight", "Gelu->Relu", 1),
    "resnet": ("layer3.0.conv2.weight", "Relu", 9),
}

#: (model, framework, defect) -> the module that must be reported first.
EXPECTED: dict[tuple[str, str, str], str] = {
    # the perturbed weight's own module; torch folds a BatchNorm into the conv before it,
    # so the fused node carries the BatchNorm's scope and the conv has no ONNX value
    ("mlp", "torch", "weight"): "hidden",
    ("mlp", "flax", "weight"): "hidden",
    ("cnn", "torch", "weight"): "bn2",
    ("cnn", "flax", "weight"): "conv2",
    ("transformer", "torch", "weight"): "fc1",
    ("transformer", "flax", "weight"): "fc1",
    ("minilm", "torch", "weight"): "encoder.layer.3.attention.self.query",
    ("minilm", "flax", "weight"): "encoder/layer_3/attention/query",
    # a functional activation between two modules: the module that consumes it (cnn
    # torch: conv2 has no ONNX value of its own, see above)
    ("mlp", "torch", "swap"): "output",
    ("mlp", "flax", "swap"): "output",
    ("cnn", "torch", "swap"): "bn2",
    ("cnn", "flax", "swap"): "conv2",
    ("transformer", "torch", "swap"): "fc2",
    ("transformer", "flax", "swap"): "fc2",
    ("minilm", "torch", "swap"): "encoder.layer.3.output.dense",
    ("minilm", "flax", "swap"): "encoder/layer_3/output",
    # the overflow sits on the weight's consumer output: inside the module when more of
    # the module follows (bias Add, Reshape), else in the next module's input
    ("mlp", "torch", "fp16"): "output",
    ("mlp", "flax", "fp16"): "output",
    ("cnn", "torch", "fp16"): "fc",
    ("cnn", "flax", "fp16"): "bn2",
    ("transformer", "torch", "fp16"): "fc1",
    ("transformer", "flax", "fp16"): "fc1",
    ("minilm", "torch", "fp16"): "encoder.layer.3.attention.self.query",
    ("minilm", "flax", "fp16"): "encoder/layer_3/attention/query",
    ("bert", "torch", "weight"): "encoder.layer.1.attention.self.query",
    ("bert", "flax", "weight"): "encoder/layer_1/attention/query",
    ("bert", "torch", "swap"): "encoder.layer.1.output.dense",
    ("bert", "flax", "swap"): "encoder/layer_1/output",
    ("bert", "torch", "fp16"): "encoder.layer.1.attention.self.query",
    ("bert", "flax", "fp16"): "encoder/layer_1/attention/query",
    ("gpt2", "torch", "weight"): "transformer.h.1.mlp.c_fc",
    ("gpt2", "flax", "weight"): "h_1/mlp/c_fc",
    ("gpt2", "torch", "swap"): "transformer.h.1.mlp.c_proj",
    ("gpt2", "flax", "swap"): "h_1/mlp/c_proj",
    ("gpt2", "torch", "fp16"): "transformer.h.1.mlp.c_fc",
    ("gpt2", "flax", "fp16"): "h_1/mlp/c_fc",
    # layer3.0's first ReLU feeds conv2 (torch: fused into bn2); the overflow after bn2
    # reaches the residual add and the block's second ReLU call (a module called twice
    # is not mapped), so the block itself
    ("resnet", "torch", "weight"): "layer3.0.bn2",
    ("resnet", "flax", "weight"): "layer3_0/conv2",
    ("resnet", "torch", "swap"): "layer3.0.bn2",
    ("resnet", "flax", "swap"): "layer3_0/conv2",
    ("resnet", "torch", "fp16"): "layer3.0",
    ("resnet", "flax", "fp16"): "layer3_0/bn2",
}

FAST = {("mlp", "torch")}  # the rest: a bigger model, or the flax framework's first jit: slow
CASES = [
    pytest.param(m, fw, d, id=f"{m}-{fw}-{d}", marks=() if (m, fw) in FAST else pytest.mark.slow)
    for m in registry.names()
    for fw in registry.get(m).frameworks
    for d in DEFECTS
]


def _cases(b: Path) -> list[str]:
    """Two of a shared bundle's test cases: batch 1 and 7, other dims nearest the model's defaults."""
    manifest = json.loads((b / "manifest.json").read_text())
    spec = registry.get(manifest["model"])
    out = []
    for batch in (1, 7):
        sets = [s for s in manifest["test_data_sets"] if s["dims"].get("batch") == batch]
        best = min(sets, key=lambda s: sum(abs(v - spec.dims.get(d, v)) for d, v in s["dims"].items() if d != "batch"))
        out.append(best["case"])
    return out


@pytest.fixture
def bundle(exported: Any, tmp_path: Path) -> Any:
    """``bundle(model, framework)``: a private copy of the shared bundle (``exported``)."""

    def get(model: str, framework: str) -> Path:
        return _copy(exported.out / model / framework, tmp_path)

    return get


def _copy(bundle: Path, tmp: Path) -> Path:
    dest = tmp / f"{bundle.parent.name}-{bundle.name}"
    shutil.copytree(bundle, dest)
    return dest


def _state(bundle: Path) -> dict[str, np.ndarray]:
    from exporter import state

    return state.load_state(bundle / "state.safetensors")


# --------------------------------------------------------------------------- defects
def _weight_initializer(model: onnx.ModelProto, weight: np.ndarray, key: str) -> str:
    """The initializer holding ``weight``: the same multiset of values (any layout, any
    name), else the one named ``key`` (torch folds a BatchNorm into the conv's weights)."""
    want = np.sort(weight.ravel())
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.size == weight.size and a.dtype == weight.dtype and np.array_equal(np.sort(a.ravel()), want):
            return t.name
    names = [t.name for t in model.graph.initializer if t.name == key]
    assert names, f"no initializer holds {key}"
    return names[0]


def _consumer(model: onnx.ModelProto, value: str) -> onnx.NodeProto:
    users = [n for n in model.graph.node if value in n.input]
    assert len(users) == 1, (value, [n.name for n in users])
    return users[0]


def inject(bundle: Path, model_name: str, defect: str) -> str | None:
    """Edit ``bundle/model.onnx`` in place (a copy): returns the name of the node the defect is in."""
    if defect == "none":
        return None
    key, act, k = TARGETS[model_name]
    path = bundle / "model.onnx"
    model = onnx.load(str(path))
    weight = _state(bundle)[key]
    init = _weight_initializer(model, weight, key)
    if defect == "weight":
        t = next(t for t in model.graph.initializer if t.name == init)
        a = numpy_helper.to_array(t)
        rng = np.random.default_rng(0)
        t.CopyFrom(numpy_helper.from_array((a + 0.05 * a.std() * rng.standard_normal(a.shape)).astype(a.dtype), init))
        node = _consumer(model, init).name
    elif defect == "swap":
        act, _, to = act.partition("->")
        nodes = [n for n in model.graph.node if n.op_type == act]
        n = nodes[k]
        if to:
            n.op_type = to
            del n.attribute[:]
        elif act == "Gelu":
            tanh = any(a.name == "approximate" and a.s == b"tanh" for a in n.attribute)
            del n.attribute[:]
            n.attribute.append(helper.make_attribute("approximate", "none" if tanh else "tanh"))
        else:
            n.op_type = "LeakyRelu"
            n.attribute.append(helper.make_attribute("alpha", 0.1))
        node = n.name
    else:
        producer = _consumer(model, init)
        out = producer.output[0]
        assert out not in {o.name for o in model.graph.output}
        # Scaled so that fp16 cannot hold it (|x| > 0.066 overflows 65504): the Cast to
        # float16 is the node that makes Inf; the rest scales back what survived.
        big = 1e6
        nodes = [
            helper.make_node("Mul", [out, "defect_big"], ["defect_scaled"], name="defect_scale"),
            helper.make_node("Cast", ["defect_scaled"], ["defect_f16"], to=TensorProto.FLOAT16, name="defect_cast_f16"),
            helper.make_node("Cast", ["defect_f16"], ["defect_f32"], to=TensorProto.FLOAT, name="defect_cast_f32"),
            helper.make_node("Div", ["defect_f32", "defect_big"], ["defect_out"], name="defect_unscale"),
        ]
        model.graph.initializer.append(numpy_helper.from_array(np.array(big, dtype=np.float32), "defect_big"))
        for n in model.graph.node:
            for i, v in enumerate(n.input):
                if v == out and n.name != "defect_scale":
                    n.input[i] = "defect_out"
        at = list(model.graph.node).index(producer) + 1
        for j, n in enumerate(nodes):
            model.graph.node.insert(at + j, n)
        node = "defect_cast_f16"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return node


# --------------------------------------------------------------------------- the proof
@pytest.mark.parametrize(("model", "framework", "defect"), CASES)
def test_defect_is_named_first(bundle: Any, model: str, framework: str, defect: str) -> None:
    import exporter

    b = bundle(model, framework)
    node = inject(b, model, defect)
    # flax compiles once per input shape (twice where a module fails): one case there
    cases = _cases(b) if framework == "torch" else _cases(b)[1:]
    report = exporter.explain(b, cases=cases, intra_op_threads=1)
    text = report.table()
    if defect == "none":
        assert report.ok, text
        assert report.first is None and report.nonfinite is None, text
        assert all(m.ok for m in report.modules), text
        # every module is mapped, or says why not: fused away, or called several times
        for m in report.modules:
            assert m.status in ("compared", "alias", "absent") or (m.status == "ambiguous" and "called" in m.detail), text
        return
    assert not report.ok, text
    first = report.divergence
    assert first is not None, text
    assert node in {n.name for n in first.nodes}, text
    if (model, framework, defect) in EXPECTED:
        assert report.first == EXPECTED[(model, framework, defect)], text
    assert first.check is not None and not first.check.ok and first.inputs_ok, text
    # everything before it is within tolerance
    before = [m for m in report.modules if m.order < first.order]
    assert all(m.ok for m in before), text
    if defect == "fp16":
        assert report.nonfinite is not None, text
        assert report.nonfinite.node == "defect_cast_f16" and report.nonfinite.kind == "Inf", text
    else:
        assert report.nonfinite is None, text
    # the report round-trips through JSON
    again = ex.ExplainReport.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()


def test_untouched_bundle_reports_no_divergence_and_keeps_its_files(exported: Any) -> None:
    import exporter

    b = exported.out / "mlp" / "torch"
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    report = exporter.explain(b, intra_op_threads=1)
    assert report and report.first is None
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    assert [m.label for m in report.modules] == ["hidden", "output", "(model)"]
    assert report.module("output").growth is not None
    assert "no divergent module" in report.summary()


def test_reference_runtime_names_the_same_place(bundle: Any) -> None:
    import exporter

    b = bundle("mlp", "torch")
    node = inject(b, "mlp", "weight")
    report = exporter.explain(b, runtime="reference", cases=_cases(b))
    assert report.runtime == "reference" and report.first == "hidden"
    assert node in {n.name for n in report.divergence.nodes}  # type: ignore[union-attr]


def test_table_and_lines_name_the_module_nodes_and_errors(bundle: Any) -> None:
    import exporter

    b = bundle("mlp", "torch")
    inject(b, "mlp", "swap")
    report = exporter.explain(b, cases=_cases(b), intra_op_threads=1)
    text = report.table()
    assert "FIRST" in text and "first divergence: output (Linear), from case batch=1" in text
    assert "LeakyRelu" in text  # the swapped node is listed among the module's nodes
    assert "model.onnx changed after export" in " ".join(report.notes)
    d = report.to_dict()
    assert d["format"] == "exporter-explain" and d["first"] == "output" and d["ok"] is False


def test_cases_selects_test_data_sets(bundle: Any) -> None:
    import exporter

    b = bundle("mlp", "torch")
    inject(b, "mlp", "weight")
    report = exporter.explain(b, cases=["batch=7"], intra_op_threads=1)
    assert report.cases == ("batch=7",) and report.first_case == "batch=7"
    with pytest.raises(UsageError, match="no test case"):
        exporter.explain(b, cases=["batch=99"])


def test_unknown_runtime_is_a_usage_error(exported: Any) -> None:
    import exporter

    with pytest.raises(UsageError, match="unknown runtime"):
        exporter.explain(exported.out / "mlp" / "torch", runtime="node")


# --------------------------------------------------------------------------- state provenance
def test_checkpoint_is_checked_against_the_manifest(bundle: Any, tmp_path: Path) -> None:
    import exporter
    from exporter import rebuild, state

    b = bundle("mlp", "torch")
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(b / "state.safetensors", moved)
    with pytest.raises(UsageError, match="does not exist.*--checkpoint"):
        exporter.explain(b)
    assert exporter.explain(b, checkpoint=moved, cases=_cases(b), intra_op_threads=1).first is None
    other = tmp_path / "other.safetensors"
    state.save_state(rebuild.init_state(registry.get("mlp"), seed=1), other)
    with pytest.raises(StateMismatchError, match="sha256"):
        exporter.explain(b, checkpoint=other)


# --------------------------------------------------------------------------- mapping pieces
def test_resolve_scope_against_known_modules() -> None:
    known = {"", "attn", "attn/query", "encoder", "encoder/layer_0", "encoder/layer_0/attention"}
    assert flax_scopes.resolve_scope("EncoderBlock/attn/attn/query", known) == "attn/query"
    assert flax_scopes.resolve_scope("MiniLM/encoder/layer_0/jit(gelu)", known) == "encoder/layer_0"
    assert flax_scopes.resolve_scope("MiniLM", known) == ""
    assert flax_scopes.resolve_scope("MiniLM/nothing/here", known) == ""


def test_layout_permutations() -> None:
    assert ex._layout((2, 28, 28, 8), (2, 8, 28, 28)) == (0, 3, 1, 2)
    assert ex._layout((2, 8, 28, 28), (2, 28, 28, 8)) == (0, 2, 3, 1)
    assert ex._layout((2, 5, 32), (2, 5, 32)) == (0, 1, 2)
    assert ex._layout((2, 5, 32), (10, 32)) is None


@pytest.mark.slow
def test_recording_scopes_does_not_change_the_flax_graph() -> None:
    import jax
    import jax2onnx

    from exporter import rebuild

    spec = registry.get("cnn")
    variables = rebuild.flax_variables(spec, rebuild.init_state(spec, framework="flax"))
    module = spec.factory("flax")()

    def fn(x: Any) -> Any:
        return module.apply(variables, x, train=False)

    def export() -> onnx.ModelProto:
        return jax2onnx.to_onnx(fn, [jax.ShapeDtypeStruct((2, 1, 28, 28), np.float32)], opset=20)

    plain = export()
    with flax_scopes.recording() as rec:
        assert rec.active, rec.reason
        with flax_scopes.recording() as inner:  # nested: the outer hooks serve
            assert inner.active
        recorded = export()
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in recorded.graph.node] == [
        (n.name, n.op_type, list(n.input), list(n.output)) for n in plain.graph.node
    ]
    scopes = flax_scopes.node_scopes(recorded)
    assert set(scopes.values()) >= {"CNN/conv1", "CNN/bn1", "CNN/conv2", "CNN/bn2", "CNN/fc"}
    assert not flax_scopes.node_scopes(plain)
    assert not flax_scopes.node_scopes(export())  # the hooks are gone afterwards


@pytest.mark.slow
def test_flax_bundle_without_recorded_scopes_is_reexported(bundle: Any) -> None:
    """A flax bundle made before scopes were recorded: explain exports the model again to get them."""
    import exporter

    b = bundle("cnn", "flax")
    model = onnx.load(str(b / "model.onnx"))
    for n in model.graph.node:
        keep = [p for p in n.metadata_props if p.key != flax_scopes.SCOPE_KEY]
        del n.metadata_props[:]
        n.metadata_props.extend(keep)
    onnx.save(model, str(b / "model.onnx"))
    node = inject(b, "cnn", "weight")
    report = exporter.explain(b, cases=_cases(b), intra_op_threads=1)
    assert "re-exporting" in report.mapping and report.first == "conv2", report.table()
    assert node in {n.name for n in report.divergence.nodes}  # type: ignore[union-attr]


# --------------------------------------------------------------------------- wiring
def test_cli_explain(bundle: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from exporter.cli import EXPLAIN_RUNTIMES, main

    assert EXPLAIN_RUNTIMES == ex.RUNTIMES
    b = bundle("mlp", "torch")
    assert main(["explain", str(b), "--case", "batch=1"]) == 0
    assert "no divergent module" in capsys.readouterr().out
    inject(b, "mlp", "weight")
    assert main(["explain", str(b), "--case", "batch=1", "--case", "batch=7", "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "exporter-explain" and d["first"] == "hidden" and d["cases"] == ["batch=1", "batch=7"]
    assert main(["explain", str(b), "--runtime", "node"]) == 2  # argparse: not an explain runtime
    capsys.readouterr()
    assert main(["explain", str(b / "nope")]) == 2
    assert "BundleError" in capsys.readouterr().err


def test_export_explains_a_failing_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import exporter
    from exporter.bundle import BundleResult
    from exporter.cli import main

    # atol = rtol = 0 for the outputs: float32 rounding makes y fail; the hidden layer's
    # value keeps its dtype's tolerance and passes: the module computing y is named first
    report = exporter.export("mlp", framework="torch", out=tmp_path, batch_sizes=(2,), atol=0.0, rtol=0.0, intra_op_threads=1)
    (r,) = report.results
    assert not r.ok and r.explain is not None and r.explain.first == "output", r.table()
    assert r.explain.module("hidden").ok and r.explain.divergence.check.atol == 0.0  # type: ignore[union-attr]
    parity = json.loads((r.path / "parity.json").read_text())
    assert parity["explain"]["format"] == "exporter-explain" and parity["ok"] is False
    assert exporter.ParityReport.from_dict(parity).ok is False  # parity.json still reads as a report
    assert "explain, onnxruntime vs torch" in r.table()
    assert BundleResult.from_dict(json.loads(json.dumps(r.to_dict()))).explain == r.explain
    assert main(["export", "mlp", "--framework", "torch", "--out", str(tmp_path / "cli"), "--batch-sizes", "2",
                 "--atol", "0", "--rtol", "0", "--no-explain"]) == 1  # fmt: skip
    assert "explain" not in json.loads((tmp_path / "cli" / "mlp" / "torch" / "parity.json").read_text())
    assert "explain," not in capsys.readouterr().out


# --------------------------------------------------------------------------- a user's model
def _tiny_spec() -> Any:
    from exporter.layouts import Dense
    from exporter.models.registry import ModelSpec, TensorSpec

    def build_torch() -> Any:
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(8, 16)
                self.head = nn.Linear(16, 3)

            def forward(self, x: Any) -> Any:
                return self.head(nn.functional.gelu(self.fc(x)))

        return Net()

    def build_flax() -> Any:
        import flax.linen as nn

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x: Any) -> Any:
                return nn.Dense(3, name="head")(nn.gelu(nn.Dense(16, name="fc")(x), approximate=False))

        return Net()

    return ModelSpec(
        name="explain_tiny", summary="two Linears and a GELU", inputs=(TensorSpec("x", ("batch", 8)),), outputs=("y",),
        layout=(Dense("fc", "fc"), Dense("head", "head")), torch_factory=build_torch, flax_factory=build_flax,
    )  # fmt: skip


@pytest.mark.parametrize(
    "framework", [pytest.param("torch"), pytest.param("flax", marks=pytest.mark.slow)]
)
def test_user_registered_model(tmp_path: Path, framework: str) -> None:
    import exporter

    spec = registry.register(_tiny_spec())
    try:
        exporter.export("explain_tiny", framework=framework, out=tmp_path / "out", batch_sizes=(2,), intra_op_threads=1)
        b = _copy(tmp_path / "out" / "explain_tiny" / framework, tmp_path)
        model = onnx.load(str(b / "model.onnx"))
        init = _weight_initializer(model, _state(b)["head.weight"], "head.weight")
        t = next(t for t in model.graph.initializer if t.name == init)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.01, init))
        onnx.save(model, str(b / "model.onnx"))
        report = exporter.explain(b, intra_op_threads=1)
        assert report.first == "head", report.table()
        assert _consumer(model, init).name in {n.name for n in report.divergence.nodes}  # type: ignore[union-attr]
    finally:
        registry.unregister(spec.name)


def test_reduced_precision_values_are_compared_with_their_tolerance() -> None:
    from exporter.models.registry import DEFAULT_TOLERANCES

    def tol(_name: str, dtype: str) -> Any:
        return DEFAULT_TOLERANCES[dtype]

    ref = np.linspace(-2, 2, 64, dtype=np.float32).reshape(4, 16)
    half = ref.astype(np.float16)  # float16 rounding: ~5e-4 relative, within float16's 1e-2
    ident = (0, 1)
    ok = ex._compare_value("v", ref, None, ident, half, tol, "c", {})
    assert ok.ok and ok.rtol == DEFAULT_TOLERANCES["float16"].rtol and ok.dtype == "float32"
    bad = ex._compare_value("v", ref, None, ident, (ref * 1.1).astype(np.float16), tol, "c", {})
    assert not bad.ok
    # only the elements that reach the outputs count, except where one side is non-finite
    relevant = np.zeros(ref.shape, dtype=bool)
    relevant[0] = True
    off = ref.copy()
    off[1:] += 1.0
    assert ex._compare_value("v", ref, relevant, ident, off, tol, "c", {}).ok
    off[2, 3] = np.inf
    masked = ex._compare_value("v", ref, relevant, ident, off, tol, "c", {})
    assert not masked.ok and masked.nan_mismatch == 1 and masked.shape == (4, 16) and masked.n_total == 17


@pytest.mark.slow
def test_real_minilm_weights_report_no_divergence(tmp_path: Path) -> None:
    """On the real all-MiniLM-L6-v2 weights, hidden states at padded positions differ by up
    to 1.4e-4 between torch and onnxruntime (measured at batch 64, seq 16): values no output
    depends on.  Compared over every element they look like a divergence in layer 3; over
    the elements that reach the outputs (the default) there is none."""
    import exporter
    from exporter.errors import MissingDependencyError
    from exporter.models import minilm

    try:
        ckpt = minilm.checkpoint_path()
    except MissingDependencyError as e:
        skip_unless_ci(str(e))
    exporter.export("minilm", checkpoint=ckpt, framework="torch", out=tmp_path, batch_sizes=(64,), dims={"seq": (16,)}, intra_op_threads=1)
    report = exporter.explain(tmp_path / "minilm" / "torch", intra_op_threads=1)
    assert report.ok and report.first is None, report.table()
    assert all(m.status in ("compared", "alias") for m in report.modules), report.table()


def test_variant_bundle_is_explained_against_the_framework(tmp_path: Path) -> None:
    """A float16 variant: its state is its source bundle's; its float16 values are compared
    with float16's tolerance; the report still names every module."""
    import exporter

    report = exporter.export("mlp", framework="torch", out=tmp_path, batch_sizes=(2,), variants="fp16", intra_op_threads=1)
    (variant,) = report.results[0].variants
    assert variant.path is not None
    explained = exporter.explain(variant.path.parent, intra_op_threads=1)
    assert "torch/state.safetensors" in explained.notes[0].replace("\\", "/")
    hidden = explained.module("hidden")
    assert hidden.check is not None and hidden.check.atol == 1e-3 and hidden.check.dtype == "float32"
    assert [m.label for m in explained.modules] == ["hidden", "output", "(model)"]
