"""exporter.training: deterministic training, auto-resume, bit-exact recovery from SIGKILL.

The crash tests run ``python -m exporter train`` in subprocesses and make them SIGKILL
themselves at exact points through the test-only ``EXPORTER_TEST_CRASH_AT`` hook (between
steps, after k files of a checkpoint write, after the commit rename, in the middle of
retention), restart until done, and compare the final checkpoint with an uninterrupted run:
every file (model, optimizer, RNG states, data position) must be byte-identical.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter import checkpoint as C
from exporter.errors import CheckpointError, UsageError
from exporter.lock import lock_dir
from exporter.training import TrainResult, train


def _final_hashes(step_dir: Path) -> dict[str, str]:
    """The digest of every file of a checkpoint except the manifest (which holds a timestamp)."""
    m = json.loads((step_dir / "manifest.json").read_text())
    return {name: meta[m["hash"]] for name, meta in m["files"].items()}


def _run_cli(ckpt_dir: Path, args: list[str], crash: str | None, tmp_cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop(C.CRASH_ENV, None)
    if crash is not None:
        env[C.CRASH_ENV] = crash
    # Share compiled XLA programs between the flax subprocesses (same programs -> same bits; faster).
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "exporter", "train", "mlp", "--ckpt-dir", str(ckpt_dir), "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _flip_tensor_byte(path: Path, tensor: str) -> None:
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + n])[tensor]["data_offsets"]
    data[8 + n + (begin + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _scramble_global_rngs() -> None:
    import random

    random.seed(12345)
    np.random.seed(12345)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(12345)


# (crash point, step directories right after the crash)
TORCH_CRASHES = [
    ("step:3", ["step-00000002"]),  # between steps: step 3 is lost, 2 is the newest
    ("write:4:2", ["step-00000002"]),  # two files of step 4 in the temp dir, then killed
    ("prune:8", ["step-00000006", "step-00000008"]),  # killed after removing step 4 (step 2 went at 6)
]
FLAX_CRASHES = [
    ("step:3", ["step-00000002"]),
    ("commit:4", ["step-00000002", "step-00000004"]),  # renamed, retention not run yet
    ("write:6:1", ["step-00000002", "step-00000004"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "framework, steps, crashes",
    [("torch", 10, TORCH_CRASHES), ("flax", 6, FLAX_CRASHES)],
    ids=["torch", "flax"],
)
def test_sigkill_and_resume_is_bit_exact(
    tmp_path: Path, framework: str, steps: int, crashes: list[tuple[str, list[str]]]
) -> None:
    args = ["--steps", str(steps), "--every", "2", "--keep", "2", "--framework", framework, "--seed", "3"]
    cache = tmp_path / "xla-cache"
    crashed = tmp_path / "crashed"
    for point, expected in crashes:
        proc = _run_cli(crashed, args, point, cache)
        assert proc.returncode == -signal.SIGKILL, f"{point}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
        assert [p.name for p in C.step_dirs(crashed)] == expected, point
        leftovers = [p.name for p in crashed.iterdir() if p.name.startswith(".tmp-")]
        if point.startswith(("write:", "prune:")):  # the next start must clean these up
            assert leftovers, point

    # Damage the newest checkpoint too: the restart must report it on stderr and use the one before.
    newest = C.step_dirs(crashed)[-1]
    _flip_tensor_byte(newest / "model.safetensors", "hidden.weight")
    proc = _run_cli(crashed, args, None, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping corrupt or partial checkpoint {newest}" in proc.stderr
    assert "tensor 'hidden.weight' blake3 mismatch" in proc.stderr
    assert "removed leftover" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and result["final_step"] == steps
    assert not [p for p in crashed.iterdir() if p.name.startswith(".tmp-")]
    assert (crashed / f"{newest.name}.corrupt").is_dir()  # moved aside, not deleted
    assert [p.name for p in C.step_dirs(crashed)] == [f"step-{steps - 2:08d}", f"step-{steps:08d}"]

    # The uninterrupted reference, in this process through the Python API.
    ref_dir = tmp_path / "reference"
    ref = train("mlp", ref_dir, steps, every=2, keep=2, framework=framework, seed=3)
    assert ref.params_sha256 == result["params_sha256"]
    final = f"step-{steps:08d}"
    assert _final_hashes(crashed / final) == _final_hashes(ref_dir / final)
    a, b = C.load_model_state(crashed), C.load_model_state(ref_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("framework", ["torch", "flax"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_in_process_resume_is_bit_exact(tmp_path: Path, model: str, framework: str) -> None:
    kw = dict(framework=framework, batch_size=4, dataset_size=8, keep=1)  # 2 steps per epoch
    whole = train(model, tmp_path / "whole", 5, every=1, **kw)
    # Stop in the middle of the second epoch, so the resume needs the saved permutation, and
    # cross another epoch after it, so it needs the permutation generator's state too.
    first = train(model, tmp_path / "parts", 3, every=3, **kw)
    _scramble_global_rngs()  # as if a new process: the resume must restore every RNG itself
    second = train(model, tmp_path / "parts", 5, every=3, **kw)
    assert (first.start_step, first.final_step) == (0, 3)
    assert second.start_step == 3 and second.resumed_from.endswith("step-00000003")
    assert second.params_sha256 == whole.params_sha256
    assert _final_hashes(tmp_path / "parts" / "step-00000005") == _final_hashes(tmp_path / "whole" / "step-00000005")
    # the model part is canonical (torch names) for both frameworks, ready for export
    from exporter import rebuild
    from exporter.models import registry

    spec = registry.get(model)
    state, report = rebuild.prepare_state(spec, C.load_model_state(tmp_path / "parts"), source="ckpt")
    assert report.ok and report.layout == "torch"
    assert C.state_sha256(state) == second.params_sha256


def test_result_and_nothing_to_do(tmp_path: Path) -> None:
    r = train("mlp", tmp_path, 2, every=5, keep=1)
    assert isinstance(r, TrainResult) and r and r.final_step == 2
    assert [Path(p).name for p in r.checkpoints] == ["step-00000002"]  # the last step is always saved
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["ok"] and d["config"]["seed"] == 0 and d["checkpoint"].endswith("step-00000002")
    again = train("mlp", tmp_path, 1, every=5, keep=1)
    assert again.start_step == 2 and again.final_step == 2 and again.params_sha256 == r.params_sha256


def test_resume_picks_newest_valid_and_warns(tmp_path: Path) -> None:
    train("mlp", tmp_path, 4, every=2, keep=3)
    (tmp_path / "step-00000004" / "manifest.json").unlink()  # partial newest
    with pytest.warns(C.CheckpointWarning, match=r"step-00000004: manifest\.json is missing.*resuming from step-00000002"):
        r = train("mlp", tmp_path, 4, every=2, keep=3)
    assert r.start_step == 2 and len(r.skipped) == 1
    assert (tmp_path / "step-00000004.corrupt").is_dir()
    ref = train("mlp", tmp_path / "ref", 4, every=2, keep=3)
    assert r.params_sha256 == ref.params_sha256


def test_directory_of_another_model(tmp_path: Path) -> None:
    train("mlp", tmp_path, 1, every=1, keep=1)
    with pytest.raises(CheckpointError, match=r"checkpoints of model 'mlp'.*not of model 'cnn'"):
        train("cnn", tmp_path, 2, every=1, keep=1)
    with pytest.raises(CheckpointError, match=r"torch training run of 'mlp'.*--framework flax"):
        train("mlp", tmp_path, 2, every=1, keep=1, framework="flax")
    with pytest.raises(CheckpointError, match=r"seed: checkpoint has 0, now 1"):
        train("mlp", tmp_path, 2, every=1, keep=1, seed=1)
    assert [p.name for p in C.step_dirs(tmp_path)] == ["step-00000001"]  # nothing touched


def test_architecture_changed_under_the_same_name(tmp_path: Path) -> None:
    m = C.load_model_state  # a checkpoint whose model part does not fit the current mlp
    C.save_checkpoint(
        tmp_path,
        1,
        model="mlp",
        framework="torch",
        tensors={"model": {"hidden.weight": np.zeros((3, 20), np.float32)}},
        state={"config": {"seed": 0, "batch_size": 8, "dataset_size": 64, "lr": 1e-3, "gamma": 0.999, "weight_decay": 0.01}},
    )
    assert set(m(tmp_path)) == {"hidden.weight"}
    with pytest.raises(CheckpointError, match=r"does not fit(.|\n)*hidden\.weight: checkpoint has float32\[3, 20\](.|\n)*missing key 'output\.bias'"):
        train("mlp", tmp_path, 2)


def test_full_disk_keeps_previous_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    train("mlp", tmp_path, 2, every=2, keep=1)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type(real(p))(1 << 30, (1 << 30) - 10, 10))
    with pytest.raises(CheckpointError, match=r"not enough free space(.|\n)*step-00000002 is intact"):
        train("mlp", tmp_path, 4, every=2, keep=1)
    monkeypatch.undo()
    assert [p.name for p in C.step_dirs(tmp_path)] == ["step-00000002"]
    r = train("mlp", tmp_path, 4, every=2, keep=1)
    assert r.start_step == 2 and r.params_sha256 == train("mlp", tmp_path / "ref", 4, every=2, keep=1).params_sha256


def test_lock_refuses_a_second_run(tmp_path: Path) -> None:
    with lock_dir(tmp_path):
        with pytest.raises(CheckpointError, match="another training run is using"):
            train("mlp", tmp_path, 1)


def test_usage_errors_listed_together(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"(?s)every must be.*framework must be.*keep must be"):
        train("mlp", tmp_path, 1, every=0, keep=0, framework="tf")
    assert not any(tmp_path.iterdir())


def test_cli_usage_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exporter.cli import main

    assert main(["train", "mlp", "--ckpt-dir", str(tmp_path), "--steps", "1", "--keep", "0"]) == 2
    assert "--keep" in capsys.readouterr().err
    assert main(["train", "nope", "--ckpt-dir", str(tmp_path), "--steps", "1"]) == 2
    assert "UnknownModelError: unknown model 'nope'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_train_into_a_file(tmp_path: Path) -> None:
    f = tmp_path / "ck"
    f.write_text("x")
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*ck is a file"):
        train("mlp", f, 1)
    assert f.read_text() == "x"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": -1}, r"steps must be an integer >= 0 .*got -1 \(int\)"),
        ({"steps": 2.5}, r"steps must be an integer >= 0"),
        ({"steps": True}, r"steps must be an integer >= 0"),
        ({"every": 0}, r"every must be an integer >= 1"),
        ({"keep": None}, r"keep must be an integer >= 1"),
        ({"keep_every": 0}, r"keep_every must be None or an integer >= 1"),
        ({"keep_every": "5"}, r"keep_every must be None or an integer >= 1"),
        ({"framework": None}, r"framework must be one of torch, flax, got None"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\)"),
        ({"seed": 2**32}, r"seed must be an integer in \[0, 2\*\*32\)"),
        ({"seed": 1.0}, r"seed must be an integer"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1"),
        ({"batch_size": 16, "dataset_size": 8}, r"dataset_size must be an integer >= batch_size \(16\), got 8"),
        ({"dataset_size": "64"}, r"dataset_size must be an integer >= batch_size"),
        ({"lr": 0}, r"lr must be a finite number > 0"),
        ({"lr": float("nan")}, r"lr must be a finite number > 0"),
        ({"lr": "1e-3"}, r"lr must be a finite number > 0"),
        ({"on_step": 3}, r"on_step must be None or a callable"),
        ({"ckpt_dir": None}, r"ckpt_dir must be a directory path"),
        ({"ckpt_dir": ""}, r"ckpt_dir must be a directory path"),
        ({"model": 3}, r"model must be a registry name or a ModelSpec, got 3 \(int\)"),
    ],
)
def test_train_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"model": "mlp", "ckpt_dir": tmp_path / "ck", "steps": 2, **kwargs}
    with pytest.raises(UsageError, match=match):
        train(args.pop("model"), args.pop("ckpt_dir"), args.pop("steps"), **args)
    assert not any(tmp_path.iterdir())


def test_model_without_the_build_or_with_wrong_outputs(tmp_path: Path) -> None:
    import dataclasses

    from exporter.models import registry

    mlp = registry.get("mlp")
    torch_only = dataclasses.replace(mlp, name="mlp_torch_only", frameworks=("torch",))
    with pytest.raises(UsageError, match=r"model 'mlp_torch_only' has no flax build \(it has: torch\)"):
        train(torch_only, tmp_path / "a", 1, framework="flax")
    assert not any(tmp_path.iterdir())
    two = dataclasses.replace(mlp, name="mlp_two_outputs", outputs=("y", "z"))
    for framework in ("torch", "flax"):
        with pytest.raises(UsageError, match=rf"its {framework} build returns 1 output\(s\), but the ModelSpec names 2 \(y, z\)"):
            train(two, tmp_path / framework, 1, framework=framework)
        assert C.step_dirs(tmp_path / framework) == []


def test_flax_architecture_changed_under_the_same_name(tmp_path: Path) -> None:
    config = {"seed": 0, "batch_size": 8, "dataset_size": 64, "lr": 1e-3, "gamma": 0.999, "weight_decay": 0.01}
    C.save_checkpoint(
        tmp_path, 1, model="mlp", framework="flax", state={"config": config},
        tensors={"model": {"hidden.weight": np.zeros((3, 20), np.float32), "extra.bias": np.zeros(3, np.float32)}},
    )  # fmt: skip
    with pytest.raises(
        CheckpointError,
        match=r"does not fit(.|\n)*hidden\.weight: checkpoint has float32\[3, 20\](.|\n)*missing key 'output\.bias'(.|\n)*unexpected key 'extra\.bias'",
    ):
        train("mlp", tmp_path, 2, framework="flax")
