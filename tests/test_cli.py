"""The command line: every subcommand, every exit code, a bad-input case per subcommand."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter.cli import main
from exporter.models import registry

REPO = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err


# --------------------------------------------------------------------------- usage
def test_no_command_is_usage_error(capsys) -> None:
    code, _, err = run(capsys, )
    assert code == 2 and "COMMAND" in err


def test_unknown_flag_is_usage_error(capsys) -> None:
    code, _, err = run(capsys, "list", "--bogus")
    assert code == 2 and "unrecognized arguments" in err


def test_help_exits_0(capsys) -> None:
    code, out, _ = run(capsys, "export", "--help")
    assert code == 0 and "--batch-sizes" in out


# --------------------------------------------------------------------------- list
def test_list(capsys) -> None:
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in registry.names():
        assert name in out
    code, out, _ = run(capsys, "list", "--json")
    assert code == 0
    data = json.loads(out)
    assert [m["name"] for m in data] == registry.names()
    assert data[0]["frameworks"]


def test_list_bad_registry_module(capsys) -> None:
    code, _, err = run(capsys, "--registry", "no_such_module_xyz", "list")
    assert code == 2 and err.startswith("UsageError:") and "no_such_module_xyz" in err
    _no_traceback(err)


def test_python_m_exporter_list_imports_neither_torch_nor_jax() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "exporter", "list"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mlp" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "jax", "jaxlib", "flax", "jax2onnx", "onnxruntime"))
    assert not heavy


# --------------------------------------------------------------------------- inspect
def test_inspect(capsys, tmp_path: Path) -> None:
    from exporter import state

    f = tmp_path / "s.safetensors"
    state.save_state({"hidden.weight": np.zeros((4, 3), np.float32), "b": np.arange(3, dtype=np.int64)}, f)
    code, out, _ = run(capsys, "inspect", str(f))
    assert code == 0 and "safetensors" in out and "hidden.weight" in out
    code, out, _ = run(capsys, "inspect", str(f), "--json")
    data = json.loads(out)
    assert code == 0 and data["format"] == "safetensors" and data["sha256"] == state.sha256_path(f)


def test_inspect_bad_file(capsys, tmp_path: Path) -> None:
    f = tmp_path / "junk.bin"
    f.write_bytes(b"this is not a state file at all")
    code, _, err = run(capsys, "inspect", str(f))
    assert code == 2 and err.startswith("StateFileError:") and "junk.bin" in err
    _no_traceback(err)
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing.safetensors"))
    assert code == 2 and "StateFileError" in err


# --------------------------------------------------------------------------- export
def test_export_from_checkpoint_json_and_junit(capfd, tmp_path: Path) -> None:
    """A user's torch .pt with DDP prefixes -> export -> exit 0; JSON, JUnit, no exporter chatter."""
    import torch

    from exporter import state

    spec = registry.get("mlp")
    torch.manual_seed(1)
    sd = {f"module.{k}": v for k, v in spec.torch_factory().state_dict().items()}
    ckpt = tmp_path / "user.pt"
    torch.save(sd, ckpt)
    junit = tmp_path / "reports" / "parity.xml"
    code = main(["export", "mlp", "--checkpoint", str(ckpt), "--framework", "torch", "--out", str(tmp_path / "out"),
                 "--batch-sizes", "1,3", "--json", "--junit", str(junit)])  # fmt: skip
    out, err = capfd.readouterr()
    assert code == 0, err
    data = json.loads(out)
    (r,) = data["results"]
    assert data["ok"] and r["ok"] and r["checkpoint"]["sha256"] == state.sha256_path(ckpt)
    assert r["checkpoint"]["format"] == "torch"
    assert not (tmp_path / "out" / "mlp" / "torch" / "state.safetensors").exists()
    assert "[torch.onnx]" not in out + err and "torchvision" not in out + err
    assert junit.is_file() and 'failures="0"' in junit.read_text()


@pytest.mark.slow
def test_export_table_and_progress(capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "export", "mlp", "--out", str(tmp_path), "--batch-sizes", "1,5", "--atol", "1e-5", "--rtol", "1e-4", "-v")
    assert code == 0, err
    assert "mlp (torch): PASS" in out and "mlp (flax): PASS" in out and "batch=5" in out  # -v: per-case tables
    assert "[1/2] mlp (torch)" in err and "[2/2] mlp (flax)" in err  # progress when several (plain lines: not a TTY)


def test_export_prints_one_line_per_bundle(capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "export", "mlp", "--out", str(tmp_path), "--batch-sizes", "1,5")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["model", "framework", "variant", "verdict", "worst/tol", "cases", "time"]
    rows = [line.split() for line in lines[1:3]]
    assert [tuple(r[:4]) for r in rows] == [("mlp", "torch", "fp32", "PASS"), ("mlp", "flax", "fp32", "PASS")]
    assert all(r[4].endswith("x") and 0 < float(r[4][:-1]) < 1 and r[5] == "2" for r in rows)  # worst error / tolerance, cases
    assert lines[-1].startswith("PASS: 2 bundles under") and "batch=5" not in out  # per-case tables only with -v


def test_export_parity_failure_exits_1(capsys, tmp_path: Path) -> None:
    """A user model (via --registry) whose export bakes the batch size fails the sweep."""
    from test_export import BAKED_MODULE

    (tmp_path / "baked_cli_models.py").write_text(BAKED_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        code, out, err = run(capsys, "--registry", "baked_cli_models", "export", "baked", "--out", str(tmp_path / "o"), "--batch-sizes", "2,7")
    finally:
        sys.path.remove(str(tmp_path))
        registry.unregister("baked")
        sys.modules.pop("baked_cli_models", None)
    assert code == 1, err
    assert "baked (torch): FAIL" in out and "batch=7" in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["export"], "UsageError: no model given"),
        (["export", "nope"], "UnknownModelError: unknown model 'nope'; known models:"),
        (["export", "mlp", "--opset", "5"], "UsageError: opset 5"),
        (["export", "--all", "--checkpoint", "x.pt"], "- --checkpoint holds the state of one model"),  # with: x.pt is missing
        (["export", "mlp", "--checkpoint", "missing.pt"], "UsageError: checkpoint 'missing.pt' does not exist"),
        (["export", "mlp", "--inputs", "missing.npz"], "UsageError: inputs file"),
        (["export", "mlp", "--dims", "seq=3"], "unknown dim 'seq'; model 'mlp' has dynamic dims: batch"),
    ],
    ids=["no-model", "unknown-model", "bad-opset", "all-with-checkpoint", "missing-checkpoint", "missing-inputs",
         "unknown-dim"],
)
def test_export_bad_usage_exits_2(capsys, tmp_path: Path, argv: list[str], fragment: str) -> None:
    code, out, err = run(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2 and fragment in err, err
    _no_traceback(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0,2", "a,b", ""])
def test_export_bad_batch_sizes_is_argparse_error(capsys, value: str) -> None:
    code, _, err = run(capsys, "export", "mlp", "--batch-sizes", value)
    assert code == 2 and "--batch-sizes" in err


@pytest.mark.parametrize("value", ["seq", "seq=0", "=1,2", "seq=a"])
def test_export_bad_dims_is_argparse_error(capsys, value: str) -> None:
    code, _, err = run(capsys, "export", "transformer", "--dims", value)
    assert code == 2 and "--dims" in err


def test_export_dims_cross_the_batch_sizes(capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "export", "transformer", "--framework", "torch", "--batch-sizes", "1,3",
                         "--dims", "seq=2,9", "--out", str(tmp_path / "o"), "--json")  # fmt: skip
    assert code == 0, err
    (r,) = json.loads(out)["results"]
    assert r["parity"]["cases"] == ["batch=1,seq=2", "batch=1,seq=9", "batch=3,seq=2", "batch=3,seq=9"]


def test_export_and_convert_with_rename_rules(capsys, tmp_path: Path) -> None:
    from exporter import state

    rng = np.random.default_rng(0)
    f = tmp_path / "sequential.safetensors"  # nn.Sequential names, as many real checkpoints have
    state.save_state({"net.0.weight": rng.random((256, 20), np.float32), "net.0.bias": rng.random(256, np.float32),
                      "net.2.weight": rng.random((10, 256), np.float32), "net.2.bias": rng.random(10, np.float32)}, f)  # fmt: skip
    code, _, err = run(capsys, "export", "mlp", "--checkpoint", str(f), "--framework", "torch", "--out", str(tmp_path / "o"))
    assert code == 2 and "unexpected key 'net.0.weight'" in err and "--rename" in err
    rules = ["--rename", r"^net\.0\.=hidden.", "--rename", r"^net\.2\.=output."]
    code, out, err = run(capsys, "export", "mlp", "--checkpoint", str(f), "--framework", "torch", "--batch-sizes", "1,2",
                         "--out", str(tmp_path / "o"), *rules)  # fmt: skip
    assert code == 0, err
    code, out, err = run(capsys, "convert", str(f), str(tmp_path / "c.msgpack"), "--model", "mlp", "--to", "flax", *rules)
    assert code == 0, err
    assert sorted(state.load_state(tmp_path / "c.msgpack")) == [
        "params/hidden/bias", "params/hidden/kernel", "params/output/bias", "params/output/kernel"]  # fmt: skip
    code, _, err = run(capsys, "convert", str(f), str(tmp_path / "d.npz"), "--rename", "a=b")
    assert code == 2 and "renaming keys needs the model" in err
    code, _, err = run(capsys, "export", "mlp", "--rename", "(=x")
    assert code == 2 and "--rename" in err


def test_export_checkpoint_of_another_model_exits_2(capsys, tmp_path: Path) -> None:
    from exporter import state

    f = tmp_path / "wrong.safetensors"
    state.save_state({"hidden.weight": np.zeros((3, 20), np.float32), "extra": np.zeros(2, np.float32)}, f)
    code, _, err = run(capsys, "export", "mlp", "--checkpoint", str(f), "--out", str(tmp_path / "out"))
    assert code == 2 and err.startswith("StateMismatchError:")
    for fragment in ("hidden.bias", "output.weight", "extra", "hidden.weight", "wrong.safetensors"):
        assert fragment in err
    _no_traceback(err)


def test_json_error_carries_every_problem_while_the_message_is_capped(capsys, exported, tmp_path: Path) -> None:
    d = tmp_path / "b"
    shutil.copytree(exported.out / "mlp" / "torch", d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["test_data_sets"] = [{"dir": f"gone_{i:02d}", "case": f"c{i}", "dims": {}} for i in range(30)]
    (d / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run(capsys, "verify", str(d), "--json")
    assert code == 2 and err.startswith("BundleError:") and "is incomplete" in err
    _no_traceback(err)
    assert "... and 10 more test" in err and "gone_29" not in err  # the message: 20 per category
    data = json.loads(out)
    assert data["ok"] is False and data["error"]["error"] == "BundleError" and data["error"]["exit_code"] == 2
    problems = data["error"]["problems"]
    assert len(problems) == 30 and "test data set gone_29 is missing" in problems  # JSON: all of them


def test_export_collects_every_problem_of_the_request(capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "export", "mlp", "--opset", "5", "--inputs", str(tmp_path / "missing.npz"),
                         "--out", str(tmp_path / "o"), "--json")  # fmt: skip
    assert code == 2 and err.startswith("UsageError: the export request has 2 problems")
    assert "opset 5" in err and "inputs file" in err
    assert len(json.loads(out)["error"]["problems"]) == 2
    assert not (tmp_path / "o").exists()


def test_export_with_user_inputs(capsys, tmp_path: Path) -> None:
    f = tmp_path / "inputs.npz"
    np.savez(f, x=np.full((3, 20), 0.5, np.float32))
    code, out, err = run(capsys, "export", "mlp", "--framework", "flax", "--inputs", str(f), "--batch-sizes", "2",
                         "--out", str(tmp_path / "o"), "--json")  # fmt: skip
    assert code == 0, err
    (r,) = json.loads(out)["results"]
    assert r["parity"]["cases"] == ["batch=2", "inputs.npz"]
    manifest = json.loads((tmp_path / "o" / "mlp" / "flax" / "manifest.json").read_text())
    assert [s["case"] for s in manifest["test_data_sets"]] == ["batch=2", "inputs.npz"]


# --------------------------------------------------------------------------- verify
def test_verify_pass_and_json(capsys, exported) -> None:
    code, out, _ = run(capsys, "verify", str(exported.out / "mlp" / "torch"))
    assert code == 0 and "PASS" in out
    code, out, _ = run(capsys, "verify", str(exported.out / "mlp" / "flax"), "--runtime", "reference", "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_verify_out_directory_and_junit(capsys, exported, tmp_path: Path) -> None:
    junit = tmp_path / "verify.xml"
    code, out, _ = run(capsys, "verify", str(exported.out), "--junit", str(junit))
    assert code == 0
    assert out.count("PASS") == len(exported.results)
    assert junit.read_text().count("<testsuite ") == len(exported.results)


def test_verify_perturbed_bundle_exits_1(capsys, exported, tmp_path: Path) -> None:
    from exporter.hashing import sha256_file
    from test_export import _perturb_one_weight

    d = tmp_path / "b"
    shutil.copytree(exported.out / "cnn" / "torch", d)
    _perturb_one_weight(d / "model.onnx")
    code, out, err = run(capsys, "verify", str(d))
    assert code == 1 and "integrity" in out  # the hash catches it ...
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["onnx"]["sha256"] = sha256_file(d / "model.onnx")
    (d / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run(capsys, "verify", str(d))
    assert code == 1 and "FAIL" in out and "out of tolerance" in out  # ... and so do the numbers


def test_verify_bad_input_exits_2(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "verify", str(tmp_path))
    assert code == 2 and err.startswith("BundleError:") and "no exporter bundle" in err
    _no_traceback(err)
    code, _, err = run(capsys, "verify", str(tmp_path), "--runtime", "tensorflow")
    assert code == 2 and "invalid choice" in err


# --------------------------------------------------------------------------- convert
def test_convert_formats_and_frameworks(capsys, tmp_path: Path) -> None:
    from exporter import rebuild, state

    spec = registry.get("mlp")
    canonical = rebuild.init_state(spec, seed=4)
    src = tmp_path / "mlp.npz"
    state.save_state(canonical, src)
    flax_file = tmp_path / "mlp_flax.msgpack"
    code, out, err = run(capsys, "convert", str(src), str(flax_file), "--model", "mlp", "--to", "flax")
    assert code == 0, err
    flat = state.load_state(flax_file)
    assert "params/hidden/kernel" in flat
    np.testing.assert_array_equal(flat["params/hidden/kernel"], canonical["hidden.weight"].T)
    back = tmp_path / "mlp.safetensors"
    code, out, err = run(capsys, "convert", str(flax_file), str(back), "--model", "mlp", "--to", "torch", "--json")
    assert code == 0, err
    assert json.loads(out)["layout"] == "torch"
    again = state.load_state(back)
    assert sorted(again) == sorted(canonical)
    for k in canonical:
        np.testing.assert_array_equal(again[k], canonical[k])
    # format only, keys as stored
    code, out, _ = run(capsys, "convert", str(back), str(tmp_path / "copy.npz"))
    assert code == 0 and "keys as stored" in out


def test_convert_bad_input_exits_2(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "convert", str(tmp_path / "missing.pt"), str(tmp_path / "x.safetensors"))
    assert code == 2 and "StateFileError" in err
    _no_traceback(err)
    f = tmp_path / "a.npz"
    np.savez(f, w=np.zeros(2, np.float32))
    code, _, err = run(capsys, "convert", str(f), str(tmp_path / "b.npz"), "--to", "flax")
    assert code == 2 and "needs the model" in err
    code, _, err = run(capsys, "convert", str(f), str(tmp_path / "b.npz"), "--model", "mlp")
    assert code == 2 and err.startswith("StateMismatchError:")


# --------------------------------------------------------------------------- train
def test_train_then_export_checkpoint(capsys, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpts"
    code, out, err = run(capsys, "train", "mlp", "--ckpt-dir", str(ckpt), "--steps", "2", "--every", "1", "--keep", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["final_step"] == 2
    code, out, err = run(capsys, "export", "mlp", "--checkpoint", str(ckpt), "--framework", "torch", "--batch-sizes", "1,3",
                         "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 0, err
    assert re.search(r"^mlp\s+torch\s+fp32\s+PASS\s", out, re.M), out  # its line in the summary table
    manifest = json.loads((tmp_path / "o" / "mlp" / "torch" / "manifest.json").read_text())
    assert manifest["checkpoint"]["format"] == "exporter-checkpoint"
    assert manifest["checkpoint"]["path"] == str((ckpt / "step-00000002").resolve())  # the step actually used
    from exporter.hashing import sha256_file

    # a training checkpoint is identified by the sha256 of the used step's manifest.json
    # (which holds the sha256 of every file of the step)
    assert manifest["checkpoint"]["sha256"] == sha256_file(ckpt / "step-00000002" / "manifest.json")
    # same shapes, other model name: refused, naming both models
    code, _, err = run(capsys, "export", "transformer", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o2"))
    assert code == 2 and "trained for model 'mlp', not 'transformer'" in err, err


def test_train_bad_input_exits_2(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "train", "nope", "--ckpt-dir", str(tmp_path), "--steps", "2")
    assert code == 2 and "UnknownModelError" in err
    _no_traceback(err)
    code, _, err = run(capsys, "train", "mlp", "--ckpt-dir", str(tmp_path))
    assert code == 2 and "--steps" in err
