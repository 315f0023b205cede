"""The benchmark runner's quick mode, and the performance paths the benchmarks rely on.

No timed assertions: the runner test checks that a figure is produced and well formed;
the other tests check behaviour (memory sharing, fallbacks, settings), not speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter import rebuild, state
from exporter.models import registry
from exporter.runtimes.torch import TorchRuntime

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the runner
def test_runner_quick_p1(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--only", "P1", "--repeats", "1",
         "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "targets met:" in proc.stdout and "targets missed:" in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    assert doc["format"] == "exporter-benchmarks" and doc["quick"] is True
    assert doc["machine"]["cores"] >= 1 and doc["versions"]["torch"]
    assert len(doc["load_average_start"]) == 3
    figs = {f["id"]: f for f in doc["groups"]["P1"]["figures"]}
    assert set(figs) == {"P1.list", "P1.help"}
    for f in figs.values():
        assert f["ratio"]["n"] == 1 and f["ratio"]["median"] > 0
        assert f["target"] == {"op": "<=", "value": 0.25}
        assert f["met"] == (f["ratio"]["median"] <= 0.25)
    assert set(doc["summary"]) == set(figs)
    md = (out / "results.md").read_text()
    assert "| P1.list |" in md and "| P1.help |" in md
    assert not any((tmp_path / "work").iterdir()), "the run's scratch directory was not removed"


def test_runner_rejects_unknown_group(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--only", "P99", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown group(s) P99" in proc.stderr


# ----------------------------------------------------------------------------- zero-copy load (P2)
def test_safetensors_load_is_one_buffer_of_views(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    arrays = {
        "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b.flag": np.array([True, False, True]),  # 3 bytes: what follows it is misaligned
        "c.bias": np.arange(5, dtype=np.float64),
        "d.empty": np.zeros((0, 4), dtype=np.float32),
        "e.scalar": np.array(7, dtype=np.int64),
    }
    save_file(arrays, str(tmp_path / "w.safetensors"))
    loaded = state.load_state(tmp_path / "w.safetensors")
    assert list(loaded) == sorted(arrays)
    for k, a in arrays.items():
        got = loaded[k]
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a), k
        assert got.flags.writeable and got.flags.c_contiguous and got.flags.aligned, k
    big = [k for k in loaded if loaded[k].nbytes >= 8]
    bases = {id(loaded[k].base if loaded[k].base is not None else loaded[k]) for k in big if loaded[k].flags.owndata is False}
    assert bases, "expected views into the read buffer"
    loaded["a.weight"][0, 0] = 42.0  # writeable without touching the others
    assert loaded["c.bias"][0] == 0.0


def test_safetensors_load_truncated_while_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.errors import StateFileError
    from exporter.formats import _common

    path = state.save_state({"w": np.ones((64, 64), np.float32)}, tmp_path / "w.safetensors")
    monkeypatch.setattr(_common, "_pread_into", lambda fd, view, offset: len(view) - 4)  # the file shrank after validation
    with pytest.raises(StateFileError, match="truncated"):
        state.load_state(path)


def test_safetensors_bfloat16_round_trip(tmp_path: Path) -> None:
    import ml_dtypes

    a = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3)
    got = state.load_state(state.save_state({"x": a}, tmp_path / "b.safetensors"))["x"]
    assert got.dtype == a.dtype and np.array_equal(got.view(np.int16), a.view(np.int16))


# ----------------------------------------------------------------------------- zero-copy torch rebuild (P2, P6)
def _data_ptrs(module) -> dict[str, int]:  # noqa: ANN001
    return {k: v.data_ptr() for k, v in module.state_dict().items()}


def test_torch_module_shares_memory_with_canonical() -> None:
    spec = registry.get("mlp")
    canonical = rebuild.init_state(spec, seed=3)
    module = rebuild.torch_module(spec, canonical)
    ptrs = _data_ptrs(module)
    assert all(ptrs[k] == canonical[k].ctypes.data for k in canonical)
    assert not any(t.is_meta for t in module.parameters())
    assert all(p.requires_grad for p in module.parameters()) and not module.training
    copied = rebuild.torch_module(spec, canonical, copy=True)
    assert all(v.data_ptr() != canonical[k].ctypes.data for k, v in copied.state_dict().items())
    x = spec.example_inputs({"batch": 3})
    np.testing.assert_array_equal(TorchRuntime.from_module(spec, module).run(x)["y"], TorchRuntime.from_module(spec, copied).run(x)["y"])


def test_torch_module_read_only_state_is_copied() -> None:
    spec = registry.get("mlp")
    canonical = rebuild.init_state(spec, seed=4)
    for a in canonical.values():
        a.flags.writeable = False
    module = rebuild.torch_module(spec, canonical)
    assert all(v.data_ptr() != canonical[k].ctypes.data for k, v in module.state_dict().items())


def test_torch_module_falls_back_for_buffers_the_state_lacks() -> None:
    """cnn's BatchNorm num_batches_tracked is not canonical state: built normally, state copied in."""
    spec = registry.get("cnn")
    canonical = rebuild.init_state(spec, seed=5)
    module = rebuild.torch_module(spec, canonical)
    buffers = dict(module.named_buffers())
    tracked = [k for k in buffers if k.endswith("num_batches_tracked")]
    assert tracked and all(not buffers[k].is_meta and int(buffers[k]) == 0 for k in tracked)
    again = rebuild.torch_module(spec, canonical, copy=True)
    x = spec.example_inputs({"batch": 2})
    np.testing.assert_array_equal(TorchRuntime.from_module(spec, module).run(x)["y"], TorchRuntime.from_module(spec, again).run(x)["y"])


# ----------------------------------------------------------------------------- onnxruntime prepacking (P6)
def _tiny_onnx(path: Path, *, external: bool) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), name="w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)
    return path


def test_onnxruntime_prepacking_off_for_external_data(tmp_path: Path) -> None:
    from exporter.errors import UsageError
    from exporter.runtimes.onnxruntime import OnnxRuntime

    ext = _tiny_onnx(tmp_path / "ext.onnx", external=True)
    inline = _tiny_onnx(tmp_path / "inline.onnx", external=False)
    assert (tmp_path / "ext.onnx.data").is_file()
    x = {"x": np.ones((2, 8), np.float32)}
    rt_ext, rt_inline = OnnxRuntime(ext, intra_op_threads=1), OnnxRuntime(inline, intra_op_threads=1)
    assert rt_ext.session_options()["prepacking"] is False
    assert rt_inline.session_options()["prepacking"] is True
    np.testing.assert_array_equal(rt_ext.run(x)["y"], rt_inline.run(x)["y"])
    assert OnnxRuntime(ext, prepacking=True).session_options()["prepacking"] is True
    assert OnnxRuntime(inline, prepacking=False).session_options()["prepacking"] is False
    with pytest.raises(UsageError, match="prepacking must be True, False or None"):
        OnnxRuntime(inline, prepacking="yes")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- P8: optimum-cli comparison
def test_p8_without_optimum_cli_is_skipped_with_the_install_hint(tmp_path: Path) -> None:
    """No optimum-cli: P8 is skipped, not failed (exit 0, no error), and says how to install it."""
    from benchmarks import p8_optimum

    out = tmp_path / "results"
    missing = tmp_path / "no-such-venv" / "bin" / "optimum-cli"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--only", "P8", "--repeats", "1",
         "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, p8_optimum.ENV_VAR: str(missing)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    group = json.loads((out / "results.json").read_text())["groups"]["P8"]
    assert group["title"] == "single-model export vs optimum-cli"
    assert group["error"] is None and group["figures"] == []
    (note,) = group["notes"]
    assert note.startswith("skipped: optimum-cli not found at $EXPORTER_OPTIMUM_CLI")
    assert str(missing) in note and p8_optimum.INSTALL_HINT in note
    assert 'benchmarks/.venv-optimum/bin/pip install torch==2.13.0 "optimum-onnx[onnxruntime]" "transformers<4.58"' in note
    assert "skipped: optimum-cli not found" in (out / "results.md").read_text()


def test_p8_finds_optimum_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import p8_optimum

    cli = tmp_path / "optimum-cli"
    cli.write_text("#!/bin/sh\n")
    monkeypatch.setenv(p8_optimum.ENV_VAR, str(cli))
    assert p8_optimum.find_optimum_cli() is None  # not executable
    cli.chmod(0o755)
    assert p8_optimum.find_optimum_cli() == cli
    monkeypatch.delenv(p8_optimum.ENV_VAR)
    assert p8_optimum.DEFAULT_CLI == REPO / "benchmarks" / ".venv-optimum" / "bin" / "optimum-cli"
    assert p8_optimum.find_optimum_cli() == (p8_optimum.DEFAULT_CLI if p8_optimum.DEFAULT_CLI.is_file() else None)
