"""ONNX export: every registry model from both frameworks passes the sweep; the negative
control fails; torch, flax and both exports agree (three-way); a batch size baked into a
Reshape is caught; provenance; opset and external data options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporter import onnx_export
from exporter.errors import ExportError, ParityError, UsageError
from exporter.models import registry
from conftest import by_model

MODELS = registry.names()
PAIRS = [(m, fw) for m in MODELS for fw in registry.get(m).frameworks]


def _result(report, model: str, framework: str):
    for r in report.results:
        if r.model == model and r.framework == framework:
            return r
    raise AssertionError(f"{model} ({framework}) was not exported: {[e.line() for e in report.errors]}")


def test_export_all_has_no_errors(exported) -> None:
    assert not exported.errors, "\n".join(e.line() for e in exported.errors)
    assert {(r.model, r.framework) for r in exported.results} == set(PAIRS)


@pytest.mark.parametrize(("model", "framework"), PAIRS, ids=[f"{m}-{f}" for m, f in PAIRS])
def test_every_model_exports_and_passes_the_sweep(exported, model: str, framework: str) -> None:
    r = _result(exported, model, framework)
    assert r.ok, "\n".join(r.parity.failures())
    # the sweep really covered every batch size, every output (a decoder's generation
    # checks, exporter.generation, come on top of the sweep's)
    sweep = [c for c in r.parity.checks if not c.case.startswith("generation ")]
    batches = {c.dims.get("batch") for c in sweep}
    assert batches == {1, 2, 7, 64}
    for dim, sizes in registry.get(model).sweep_dims.items():  # e.g. seq lengths, crossed with batch
        assert {(c.dims["batch"], c.dims[dim]) for c in sweep} == {(b, s) for b in batches for s in sizes}
    assert {c.output for c in sweep} == set(registry.get(model).outputs)
    if framework == "torch":
        assert r.exporter == "torch.onnx.dynamo", f"fell back to TorchScript: {r.fallback_reason}"
        assert r.fallback_reason is None
    else:
        assert r.exporter == "jax2onnx"
    assert r.opset == onnx_export.DEFAULT_OPSET
    # dynamic dims carry the spec's names in the ONNX graph
    m = onnx.load(str(r.path / "model.onnx"), load_external_data=False)
    spec = registry.get(model)
    for vi, t in zip(m.graph.input, spec.inputs):
        assert vi.name == t.name
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        assert dims == list(t.shape)
    assert [o.name for o in m.graph.output] == list(spec.outputs)
    # the manifest's output dims are those of the graph just written
    from exporter.testdata import value_dims

    manifest = json.loads((r.path / "manifest.json").read_text())
    assert [o["shape"] for o in manifest["outputs"]] == [value_dims(o) for o in m.graph.output]
    assert manifest["outputs"][0]["shape"][0] == "batch"


@pytest.mark.parametrize(("model", "framework"), PAIRS, ids=[f"{m}-{f}" for m, f in PAIRS])
def test_provenance_in_metadata_and_manifest(exported, model: str, framework: str) -> None:
    r = _result(exported, model, framework)
    m = onnx.load(str(r.path / "model.onnx"), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    manifest = json.loads((r.path / "manifest.json").read_text())
    assert props["exporter.model"] == model
    assert props["exporter.framework"] == framework
    assert props["exporter.exporter"] == r.exporter == manifest["exporter"]
    assert props["exporter.checkpoint_sha256"] == manifest["checkpoint"]["sha256"] == r.checkpoint["sha256"]
    assert props["exporter.opset"] == str(manifest["opset"])
    versions = json.loads(props["exporter.versions"])
    for pkg in ("exporter", "torch", "jax", "flax", "onnx", "onnxruntime"):
        assert versions[pkg], pkg
        assert manifest["versions"][pkg] == versions[pkg]
    tol = json.loads(props["exporter.tolerances"])
    assert set(tol) == set(registry.get(model).outputs)
    assert manifest["tolerances"]["per_output"] == tol
    assert manifest["onnx"]["sha256"] == r.onnx_sha256
    assert manifest["format"] == "exporter-bundle" and manifest["format_version"] == 1
    assert manifest["created"].endswith("Z")


def _perturb_one_weight(onnx_path: Path, delta: float = 1e-3) -> str:
    """Add ``delta`` to one element of the float initializer closest to the graph output."""
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    inits = {t.name: t for t in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    frontier = [o.name for o in m.graph.output]
    seen: set[str] = set()
    while frontier:
        nxt = []
        candidates = []
        for name in frontier:
            node = producers.get(name)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            for i in node.input:
                if i in inits and numpy_helper.to_array(inits[i]).dtype.kind == "f" and numpy_helper.to_array(inits[i]).size > 1:
                    candidates.append(i)
                else:
                    nxt.append(i)
        if candidates:
            name = min(candidates, key=lambda n: numpy_helper.to_array(inits[n]).ndim)
            arr = numpy_helper.to_array(inits[name]).copy()
            arr.flat[0] += delta
            inits[name].CopyFrom(numpy_helper.from_array(arr, name))
            onnx.save(m, str(onnx_path))
            return name
        frontier = nxt
    raise AssertionError("no float initializer found")


@pytest.mark.parametrize(("model", "framework"), by_model(PAIRS, lambda p: p[0], lambda p: f"{p[0]}-{p[1]}"))
def test_negative_control_perturbed_weight_fails(exported, tmp_path: Path, model: str, framework: str) -> None:
    import exporter
    from exporter.hashing import sha256_file

    src = _result(exported, model, framework).path
    bundle = tmp_path / "bundle"
    shutil.copytree(src, bundle)
    assert exporter.verify(bundle)  # the copy passes before the edit
    _perturb_one_weight(bundle / "model.onnx", 1e-3)
    # re-hash so that only the numbers can catch the edit
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["onnx"]["sha256"] = sha256_file(bundle / "model.onnx")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = exporter.verify(bundle)
    assert not report
    assert all(not c.reason for c in report.failed_checks())  # numeric failures, not load errors
    with pytest.raises(ParityError, match="out of tolerance"):
        report.raise_for_failure()


@pytest.mark.parametrize("model", MODELS)
def test_three_way_torch_flax_and_both_exports_agree(exported, model: str) -> None:
    from exporter import parity, state
    from exporter.runtimes.jax import JaxRuntime
    from exporter.runtimes.onnxruntime import OnnxRuntime
    from exporter.runtimes.torch import TorchRuntime

    spec = registry.get(model)
    rt, rf = _result(exported, model, "torch"), _result(exported, model, "flax")
    # one canonical state feeds all four
    assert rt.checkpoint["sha256"] == rf.checkpoint["sha256"]
    canonical = state.load_state(rt.path / "state.safetensors")
    runtimes = {
        "torch": TorchRuntime(spec, canonical),
        "jax": JaxRuntime(spec, canonical),
        "onnx(torch)": OnnxRuntime(rt.path / "model.onnx", intra_op_threads=1),
        "onnx(flax)": OnnxRuntime(rf.path / "model.onnx", intra_op_threads=1),
    }
    tol = parity.tolerance_for(spec)
    failures = []
    for dims in parity.sweep_cases(spec, (1, 7)):
        inputs = spec.example_inputs(dims, seed=3)
        outs = {name: r.run(inputs) for name, r in runtimes.items()}
        names = list(outs)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                for c in parity.compare(outs[a], outs[b], tol, case=parity.case_label(dims), dims=dims):
                    if not c.ok:
                        failures.append(f"{a} vs {b}: {c.line()}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- baked batch
BAKED_MODULE = '''
from exporter.models.registry import ModelSpec, TensorSpec, register
from exporter.layouts import Dense


def build_torch():
    import torch

    class Baked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(20, 10)

        def forward(self, x):
            # int() of a traced size: torch.export specialises the batch to the example
            # size (2, a static input); the TorchScript exporter bakes 2 into the Reshape.
            n = int(x.shape[0])
            return self.lin(x.reshape(n, 20))

    return Baked()


SPEC = register(ModelSpec(
    name="baked", summary="batch baked into a Reshape (test model)",
    inputs=(TensorSpec("x", ("batch", 4, 5)),), outputs=("y",),
    layout=(Dense("lin", "lin"),), torch_factory=build_torch, frameworks=("torch",),
))
'''


@pytest.fixture
def baked_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A user-registered torch-only model whose export bakes the batch size (module ``baked_models``)."""
    import sys

    pkg = tmp_path / "plugins"
    pkg.mkdir()
    (pkg / "baked_models.py").write_text(BAKED_MODULE)
    monkeypatch.syspath_prepend(str(pkg))
    yield "baked_models"
    registry.unregister("baked")
    sys.modules.pop("baked_models", None)


def test_batch_fixed_by_the_export_is_caught_by_the_sweep(baked_model: str, tmp_path: Path) -> None:
    """torch.export specialises the batch dim of this model to the example size (2) without
    failing; the export warns, and the sweep fails every other size."""
    import exporter

    registry.load_plugins(baked_model)
    report = exporter.export("baked", out=tmp_path / "out", batch_sizes=(1, 2, 7))
    (r,) = report.results
    assert not report and report.exit_code == 1
    assert {c.case for c in r.parity.failed_checks()} == {"batch=1", "batch=7"}  # the export size alone passes
    assert any("failed to run" in line for line in r.parity.failures())
    assert any("'batch'" in w and "fixed to 2" in w for w in r.warnings)
    manifest = json.loads((r.path / "manifest.json").read_text())
    assert manifest["export_warnings"] == list(r.warnings)
    assert manifest["parity"]["ok"] is False


def test_batch_baked_into_a_reshape_is_caught_by_the_sweep(baked_model: str, tmp_path: Path) -> None:
    """The TorchScript exporter keeps the batch input dynamic but bakes the trace's batch
    size into a Reshape constant: only sizes other than the export size reveal it."""
    from exporter import parity
    from exporter.runtimes.onnxruntime import OnnxRuntime
    from exporter.runtimes.torch import TorchRuntime

    registry.load_plugins(baked_model)
    spec = registry.get("baked")
    module = spec.torch_factory().eval()
    res = onnx_export.export_torch(spec, module, tmp_path / "model.onnx", dynamo=False)
    assert res.input_dims["x"][0] == "batch" and not res.warnings  # looks dynamic from outside
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert "Reshape" in {n.op_type for n in graph.node}
    report = parity.check(
        spec, TorchRuntime.from_module(spec, module), OnnxRuntime(tmp_path / "model.onnx"), cases=parity.sweep_cases(spec, (1, 2, 7, 64))
    )
    assert {c.case for c in report.failed_checks()} == {"batch=1", "batch=7", "batch=64"}
    assert all("Reshape" in c.reason or "reshape" in c.reason.lower() for c in report.failed_checks())
    with pytest.raises(ParityError, match="batch=7"):
        report.raise_for_failure()


# --------------------------------------------------------------------------- options
def test_opset_and_forced_external_data(tmp_path: Path) -> None:
    import exporter

    report = exporter.export("mlp", framework="torch", out=tmp_path, opset=18, external_data=True, batch_sizes=(1, 3))
    (r,) = report.results
    assert r.ok and r.opset == 18 and r.external_data
    data = r.path / "model.onnx.data"
    assert data.is_file() and data.stat().st_size >= 4 * (256 * 20 + 10 * 256)
    assert (r.path / "model.onnx").stat().st_size < data.stat().st_size // 4  # weights are not inline
    manifest = json.loads((r.path / "manifest.json").read_text())
    assert manifest["onnx"]["external_data"]["file"] == "model.onnx.data"
    assert exporter.verify(r.path)
    # a changed external data file is an integrity failure
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    bad = exporter.verify(r.path)
    assert not bad and any("model.onnx.data" in line for line in bad.failures())


def test_external_data_by_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Weights over the threshold (2 GiB in real life) go to model.onnx.data without asking."""
    spec = registry.get("mlp")
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1000)
    res = onnx_export.export_torch(spec, spec.torch_factory(), tmp_path / "model.onnx")
    assert res.external_data and (tmp_path / "model.onnx.data").is_file()
    with pytest.raises(UsageError, match="external data"):
        onnx_export.export_torch(spec, spec.torch_factory(), tmp_path / "b" / "model.onnx", external_data=False)


def test_bad_opset_is_a_usage_error(tmp_path: Path) -> None:
    import exporter

    with pytest.raises(UsageError, match="opset 7"):
        exporter.export("mlp", out=tmp_path, opset=7)
    assert not any(tmp_path.iterdir())


def test_torchscript_fallback_is_recorded(tmp_path: Path) -> None:
    spec = registry.get("mlp")
    res = onnx_export.export_torch(spec, spec.torch_factory(), tmp_path / "model.onnx", dynamo=False)
    assert res.exporter == "torch.onnx.torchscript" and res.fallback_reason
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert props["exporter.fallback_reason"] == res.fallback_reason
    assert res.input_dims["x"] == ["batch", 20] and res.output_dims["y"] == ["batch", 10]


def test_exporter_chatter_is_captured(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    spec = registry.get("mlp")
    res = onnx_export.export_torch(spec, spec.torch_factory(), tmp_path / "model.onnx")
    out, err = capfd.readouterr()
    assert "[torch.onnx]" not in out + err
    assert "torch.onnx" in res.log  # kept, not lost


def test_flax_int64_inputs_keep_their_dtype(exported) -> None:
    """JAX narrows int64 to int32 without x64; the ONNX signature still follows the spec."""
    int_models = [m for m in MODELS if any(t.dtype == "int64" for t in registry.get(m).inputs)]
    if not int_models:
        pytest.skip("no registry model has int64 inputs")
    for model in int_models:
        m = onnx.load(str(_result(exported, model, "flax").path / "model.onnx"), load_external_data=False)
        spec = registry.get(model)
        for vi, t in zip(m.graph.input, spec.inputs):
            want = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            assert vi.type.tensor_type.elem_type == want, (model, vi.name)


def test_onnxscript_matchers_do_not_keep_the_exported_graph(tmp_path: Path) -> None:
    # Workaround for an onnxscript 0.7 leak (exporter.onnx_export._release_onnxscript_matchers):
    # after a torch export no pattern matcher may still reference a graph (whose initializers
    # wrap the module's weights).
    import gc

    from onnxscript.rewriter import _matcher

    from exporter import rebuild

    spec = registry.get("mlp")
    module = rebuild.torch_module(spec, rebuild.init_state(spec))
    onnx_export.export_torch(spec, module, tmp_path / "m.onnx")
    held = [o for o in gc.get_objects() if issubclass(type(o), _matcher.SimplePatternMatcher) and getattr(o, "_graph", None) is not None]
    assert not held
    matchers = [o for o in gc.get_objects() if issubclass(type(o), _matcher.SimplePatternMatcher)]
    assert matchers, "onnxscript no longer has SimplePatternMatcher objects: re-check whether the workaround is still needed"


# --------------------------------------------------------------------------- honest errors
@pytest.mark.parametrize("error", [AssertionError, TypeError])
def test_a_bug_of_ours_in_export_torch_is_not_a_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: type) -> None:
    """Only torch.onnx.export's own failure falls back to TorchScript; our code failing propagates."""
    spec = registry.get("mlp")

    def broken(spec, torch):
        raise error("bug in building dynamic_shapes")

    monkeypatch.setattr(onnx_export, "_dynamic_shapes", broken)
    with pytest.raises(error, match="bug in building dynamic_shapes"):
        onnx_export.export_torch(spec, spec.torch_factory(), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_an_export_onnxruntime_cannot_load_is_an_export_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import exporter
    from exporter.errors import RunError
    from exporter.runtimes import onnxruntime as ort_adapter

    def refuse(self, path, **kwargs):
        raise RunError(f"runtime 'onnxruntime': cannot load {path}: InvalidGraph")

    monkeypatch.setattr(ort_adapter.OnnxRuntime, "__init__", refuse)
    with pytest.raises(ExportError, match="onnxruntime cannot load the model.onnx that torch.onnx.dynamo just wrote"):
        exporter.export("mlp", framework="torch", batch_sizes=(1,), out=tmp_path)
    assert not (tmp_path / "mlp" / "torch").exists()


# --------------------------------------------------------------------------- one serialisation, still checked
def _ir_model(op: str):
    import onnx_ir as ir

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 20]))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([20]), const_value=ir.tensor(np.ones(20, np.float32), name="w"))
    node = ir.node(op, inputs=[x, w], name="n")
    node.outputs[0].name = "y"
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape(["batch", 20])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 20}, name="g")
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("external", [False, True])
def test_finish_writes_what_it_checked(tmp_path: Path, external: bool) -> None:
    """_finish serialises an inline model once: the file is byte-identical to onnx_ir's save,
    and the checker still runs (on the bytes inline, on the file with external data)."""
    import onnx_ir as ir

    spec = registry.get("mlp")
    path = tmp_path / "model.onnx"
    out = onnx_export._finish(_ir_model("Add"), spec, path, "test", None, external, {"k": "v"})
    assert out.external_data is external and (tmp_path / onnx_export.EXTERNAL_DATA_NAME).exists() is external
    onnx.checker.check_model(str(path))
    if not external:
        again = tmp_path / "again.onnx"
        ir.save(ir.load(path), again)
        assert path.read_bytes() == again.read_bytes()
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["exporter.k"] == "v"
    with pytest.raises(ExportError, match=r"fails onnx.checker: ValidationError: No Op registered for NoSuchOp"):
        onnx_export._finish(_ir_model("NoSuchOp"), spec, tmp_path / "bad" / "model.onnx", "test", None, external, None)


# --------------------------------------------------------------------------- flax reference prefetched
@pytest.mark.slow
def test_flax_reference_prefetched_during_the_torch_bundle_is_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With both frameworks, the flax reference is built and compiled in a thread while the torch
    bundle exports (exporter.bundle._prefetch_flax); its test data are the very bits a flax-only
    export records, and nothing is left behind."""
    import exporter
    from exporter import bundle, testdata

    started: list[str] = []
    real = bundle._prefetch_flax
    monkeypatch.setattr(bundle, "_prefetch_flax", lambda plan, source: (started.append(plan.spec.name), real(plan, source))[1])
    both = exporter.export("transformer", framework="all", out=tmp_path / "both")
    seeded = tmp_path / "both" / "transformer" / "flax" / bundle.STATE_FILE  # the same weights, from a file
    alone = exporter.export("transformer", framework="flax", checkpoint=seeded, out=tmp_path / "alone")
    assert started == ["transformer"] and not bundle._PREFETCH
    assert all(r.ok for r in both.results + alone.results)
    a, b = tmp_path / "both" / "transformer" / "flax", tmp_path / "alone" / "transformer" / "flax"
    sets = sorted(p.name for p in a.glob("test_data_set_*"))
    assert sets and sets == sorted(p.name for p in b.glob("test_data_set_*"))
    for name in sets:
        (ia, oa), (ib, ob) = testdata.read_test_data(a / name), testdata.read_test_data(b / name)
        for k in oa:
            np.testing.assert_array_equal(oa[k], ob[k])
        for k in ia:
            np.testing.assert_array_equal(ia[k], ib[k])
