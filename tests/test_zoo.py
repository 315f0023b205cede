"""Model-zoo directories exporter did not write: onnx's own backend test data, and hand-made ones.

The onnx wheel ships 140 such directories (``onnx/backend/test/data/{pytorch-converted,
pytorch-operator,simple}``); a sample runs in the fast loop, all of them in a slow test that
also says how many pass, fail and error, and why.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter import zoo
from exporter.errors import BundleError, UsageError

DATA = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data"
SUITES = ("pytorch-converted", "pytorch-operator", "simple")
ALL = sorted(p for s in SUITES for p in (DATA / s).iterdir() if p.is_dir())
#: One of each kind: convolution, int64 input (Embedding), several outputs (chunk), broadcasting,
#: strings (StringNormalizer, run as whole values), a model named "sequence" that holds tensors.
SAMPLE = {
    "pytorch-converted/test_Conv2d": 0,
    "pytorch-converted/test_Embedding": 0,
    "pytorch-converted/test_ReLU": 0,
    "pytorch-operator/test_operator_chunk": 0,
    "pytorch-operator/test_operator_index": 0,
    "simple/test_expand_shape_model1": 0,
    "simple/test_sequence_model1": 0,
    "simple/test_single_relu_model": 0,
    "simple/test_strnorm_model_monday_casesensintive_nochangecase": 0,
    "pytorch-converted/test_Linear": 2,  # opset 6: onnxruntime no longer has Gemm-6
}
#: Why onnxruntime cannot run some of them (exit 2): kernels of opsets below 7 were removed,
#: the training-preview Gradient op is not registered, and StringNormalizer needs the
#: en_US.UTF-8 locale, which minimal images (this one) lack.
KNOWN_ERRORS = {
    "opset < 7": re.compile(r"NOT_IMPLEMENTED : Could not find an implementation for \w+\((1|6)\)"),
    "Gradient": re.compile(r"ai\.onnx\.preview\.training:Gradient\(-1\) is not a registered function/op"),
    "locale": re.compile(r"Failed to construct locale with name:en_US\.UTF-8"),
}


def test_the_wheel_ships_140_directories() -> None:
    assert len(ALL) == 140 and all(zoo.is_zoo_dir(p) for p in ALL)
    assert zoo.find_zoo_dirs(DATA / "simple") == sorted((DATA / "simple").iterdir())


@pytest.mark.parametrize("name", sorted(SAMPLE))
def test_sample_of_the_onnx_backend_data(name: str) -> None:
    report = zoo.verify_dir(DATA / name)
    assert report.exit_code == SAMPLE[name], report.failures()
    if report.exit_code == 0:
        assert report.ok and report.parity.checks and not report.errors
        assert report.summary().endswith("PASS in onnxruntime, " + f"{len(report.parity.checks)} checks over 1 data sets")
    else:
        assert report.verdict == "ERROR" and "cannot load" in report.errors[0]
        assert report.to_dict()["exit_code"] == 2


def test_an_old_opset_model_runs_in_the_reference_evaluator() -> None:
    report = zoo.verify_dir(DATA / "pytorch-converted/test_Linear", runtime="reference")
    assert report.exit_code == 0, report.failures()


@pytest.mark.slow
def test_every_onnx_backend_directory() -> None:
    """All 140 in onnxruntime: none out of tolerance; every error is a known limitation."""
    verdicts: collections.Counter[str] = collections.Counter()
    why: collections.Counter[str] = collections.Counter()
    for d in ALL:
        r = zoo.verify_dir(d)
        verdicts[r.verdict] += 1
        if r.errors:
            kinds = [k for k, rx in KNOWN_ERRORS.items() if rx.search(r.errors[0])]
            assert kinds, (d, r.errors)
            why[kinds[0]] += 1
    print(f"\nonnx backend data in onnxruntime: {dict(verdicts)}; errors: {dict(why)}")
    assert verdicts["FAIL"] == 0
    assert verdicts["PASS"] + verdicts["ERROR"] == 140 and verdicts["PASS"] >= 100
    assert why["opset < 7"] == 34 and why["Gradient"] == 2


@pytest.mark.slow
def test_every_numeric_onnx_backend_directory_in_the_reference_evaluator() -> None:
    verdicts: collections.Counter[str] = collections.Counter()
    for d in ALL:
        r = zoo.verify_dir(d, runtime="reference")
        verdicts[r.verdict] += 1
        if r.errors:  # strings are onnxruntime-only; Gradient is a training op
            assert "takes numeric tensors only" in r.errors[0] or "Gradient" in r.errors[0], (d, r.errors)
    assert verdicts == {"PASS": 132, "ERROR": 8}


# --------------------------------------------------------------------------- hand-made directories
def _model(path: Path, nodes: list, inputs: list, outputs: list, opset: int = 18) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs), opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path / "model.onnx")
    return model


def _write(d: Path, prefix: str, protos: list) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(protos):
        (d / f"{prefix}_{i}.pb").write_bytes(p.SerializeToString())


def _add_sub(root: Path, dtype: type = np.float32) -> Path:
    """s = a + b, d = a - b."""
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    _model(
        root,
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Sub", ["a", "b"], ["d"])],
        [helper.make_tensor_value_info(n, et, [2, 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, et, [2, 3]) for n in ("s", "d")],
    )
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3)).astype(dtype), rng.standard_normal((2, 3)).astype(dtype)
    _write(root / "test_data_set_0", "input", [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")])
    _write(root / "test_data_set_0", "output", [numpy_helper.from_array(a + b, "s"), numpy_helper.from_array(a - b, "d")])
    return root


def test_inputs_by_name_else_by_order(tmp_path: Path) -> None:
    d = _add_sub(tmp_path / "z")
    a = numpy_helper.to_array(TensorProto.FromString((d / "test_data_set_0/input_0.pb").read_bytes()))
    b = numpy_helper.to_array(TensorProto.FromString((d / "test_data_set_0/input_1.pb").read_bytes()))
    assert zoo.verify_dir(d).exit_code == 0
    # files in the other order, but named: the names win
    _write(d / "test_data_set_0", "input", [numpy_helper.from_array(b, "b"), numpy_helper.from_array(a, "a")])
    assert zoo.verify_dir(d).exit_code == 0
    # unnamed files (as some tools write them): by order, so swapped values now fail "d"
    _write(d / "test_data_set_0", "input", [numpy_helper.from_array(b), numpy_helper.from_array(a)])
    r = zoo.verify_dir(d)
    assert r.exit_code == 1 and [c.output for c in r.parity.failed_checks()] == ["d"]
    # a name that is not an input, beyond the graph's inputs
    _write(d / "test_data_set_0", "input", [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(a, "c")])
    with pytest.raises(BundleError, match=r"input_2.pb: the model has only 2 inputs \(a, b\)"):
        zoo.verify_dir(d)


def test_dtype_aware_tolerances_and_overrides(tmp_path: Path) -> None:
    for dtype, delta, default_ok in ((np.float32, 5e-6, True), (np.float32, 5e-4, False), (np.float64, 1e-7, False)):
        d = _add_sub(tmp_path / f"{np.dtype(dtype).name}-{delta}", dtype)
        f = d / "test_data_set_0/output_0.pb"
        s = numpy_helper.to_array(TensorProto.FromString(f.read_bytes())).copy()
        s.flat[0] += delta
        f.write_bytes(numpy_helper.from_array(s, "s").SerializeToString())
        r = zoo.verify_dir(d)
        assert r.exit_code == (0 if default_ok else 1), (dtype, delta, r.failures())
        check = next(c for c in r.parity.checks if c.output == "s")
        assert (check.atol, check.rtol) == ((1e-5, 1e-4) if dtype == np.float32 else (1e-10, 1e-8))
        assert zoo.verify_dir(d, atol=1e-3).exit_code == 0
        assert zoo.verify_dir(d, output_tolerances={"s": (1e-3, 0.0)}).exit_code == 0
    with pytest.raises(UsageError, match="atol must be a finite number"):
        zoo.verify_dir(d, atol=-1.0)


def test_sequences_and_optionals(tmp_path: Path) -> None:
    """SequenceInsert (a sequence in, a sequence out) and OptionalHasElement / OptionalGetElement."""
    seq_t = helper.make_tensor_sequence_value_info
    opt = helper.make_value_info("o", helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2])))
    d = tmp_path / "seq"
    _model(
        d,
        [
            helper.make_node("SequenceInsert", ["s", "t"], ["s2"]),
            helper.make_node("OptionalHasElement", ["o"], ["has"]),
            helper.make_node("Identity", ["o"], ["o2"]),
        ],
        [seq_t("s", TensorProto.FLOAT, None), helper.make_tensor_value_info("t", TensorProto.FLOAT, [2]), opt],
        [seq_t("s2", TensorProto.FLOAT, None), helper.make_tensor_value_info("has", TensorProto.BOOL, []),
         helper.make_value_info("o2", opt.type)],
    )  # fmt: skip
    items = [np.array([1.0, 2.0], np.float32), np.array([3.0], np.float32)]
    t = np.array([4.0, 5.0], np.float32)
    for k, present in enumerate((np.array([6.0, 7.0], np.float32), None)):
        _write(d / f"test_data_set_{k}", "input", [
            numpy_helper.from_list(items, "s"), numpy_helper.from_array(t, "t"), numpy_helper.from_optional(present, "o", dtype=onnx.OptionalProto.TENSOR),
        ])  # fmt: skip
        _write(d / f"test_data_set_{k}", "output", [
            numpy_helper.from_list([*items, t], "s2"), numpy_helper.from_array(np.array(present is not None), "has"),
            numpy_helper.from_optional(present, "o2", dtype=onnx.OptionalProto.TENSOR),
        ])  # fmt: skip
    r = zoo.verify_dir(d)
    assert r.exit_code == 0, r.failures()
    labels = [(c.case, c.output) for c in r.parity.checks]
    assert ("test_data_set_0", "s2[2]") in labels and ("test_data_set_1", "o2") in labels
    # a wrong element of the sequence fails that element only
    _write(d / "test_data_set_0", "output", [
        numpy_helper.from_list([items[0], items[1], t + 1], "s2"), numpy_helper.from_array(np.array(True), "has"),
        numpy_helper.from_optional(np.array([6.0, 7.0], np.float32), "o2"),
    ])  # fmt: skip
    r = zoo.verify_dir(d)
    assert r.exit_code == 1 and [c.label for c in r.parity.failed_checks()] == ["s2[2] @ test_data_set_0"]
    # other runtimes take numeric tensors only: exit 2 with the fix
    r = zoo.verify_dir(d, runtime="reference")
    assert r.exit_code == 2 and "use runtime 'onnxruntime'" in r.errors[0]


def test_a_data_set_the_runtime_cannot_run_is_exit_2(tmp_path: Path) -> None:
    d = _add_sub(tmp_path / "z")
    bad = d / "test_data_set_1"
    _write(bad, "input", [numpy_helper.from_array(np.ones((2, 3), np.float32), "a"), numpy_helper.from_array(np.ones((2, 3), np.float32), "b")])
    _write(bad, "output", [numpy_helper.from_array(np.ones((2, 3), np.float32), "s")])
    assert zoo.verify_dir(d).exit_code == 1  # 1 + 1 != 1: out of tolerance, but it ran
    _write(bad, "input", [numpy_helper.from_array(np.ones((4, 3), np.float32), "a"), numpy_helper.from_array(np.ones((2, 3), np.float32), "b")])
    r = zoo.verify_dir(d)
    assert r.exit_code == 2 and r.verdict == "ERROR"
    assert r.errors[0].startswith("test_data_set_1: ") and "dim 0 is 4, expected 2" in r.errors[0]
    assert r.parity.cases == ["test_data_set_0"] and r.parity.ok  # the set that ran is still judged


def test_not_a_zoo_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="model.onnx is missing"):
        zoo.verify_dir(tmp_path)
    d = _add_sub(tmp_path / "z")
    (d / "manifest.json").write_text("{}", encoding="utf-8")
    assert not zoo.is_zoo_dir(d)  # that is a bundle: exporter.bundle verifies it
    (d / "manifest.json").unlink()
    (d / "test_data_set_0/input_1.pb").write_bytes(b"\xff\xff\xff")
    with pytest.raises(BundleError, match=r"input_1.pb is not a valid ONNX TensorProto"):
        zoo.verify_dir(d)
    (d / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="not a readable ONNX model"):
        zoo.verify_dir(d)
    with pytest.raises(UsageError, match="does not exist"):
        zoo.find_zoo_dirs(tmp_path / "nope")


# --------------------------------------------------------------------------- command line
def test_cli_verify_a_zoo_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import json

    from exporter.cli import main

    assert main(["verify", str(DATA / "simple/test_single_relu_model")]) == 0
    out = capsys.readouterr().out
    assert "test_single_relu_model: PASS in onnxruntime" in out
    assert main(["verify", str(DATA / "pytorch-converted/test_Linear"), "--json"]) == 2  # opset 6: cannot load
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == 2 and "cannot load" in report["errors"][0]
    assert main(["verify", str(DATA / "pytorch-converted/test_Linear"), "--runtime", "reference"]) == 0
    capsys.readouterr()
    # a directory of zoo directories: every one is verified
    root = tmp_path / "zoo"
    for name in ("test_single_relu_model", "test_expand_shape_model1"):
        shutil.copytree(DATA / "simple" / name, root / name)
    assert main(["verify", str(root), "--json"]) == 0
    assert [Path(r["path"]).name for r in json.loads(capsys.readouterr().out)] == ["test_expand_shape_model1", "test_single_relu_model"]
    d = _add_sub(tmp_path / "perturbed")
    f = d / "test_data_set_0/output_0.pb"
    s = numpy_helper.to_array(TensorProto.FromString(f.read_bytes())).copy()
    s.flat[0] += 1e-3
    f.write_bytes(numpy_helper.from_array(s, "s").SerializeToString())
    assert main(["verify", str(d)]) == 1
    assert "s @ test_data_set_0" in capsys.readouterr().out
    assert main(["verify", str(d), "--atol", "1e-2"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "empty-dir-that-does-not-exist")]) == 2
