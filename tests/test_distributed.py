"""Distributed training at P = 2: SIGKILL anywhere, resume bit-exact; resharding; export from shards.

Every run is ``python -m exporter train mlp ... --nproc 2`` (torch DDP / FSDP2 ranks on gloo) or
``--framework flax --devices 2`` (two XLA host devices) in a subprocess of its own session,
so a test can kill the whole job (launcher and ranks) with one ``killpg``.  The crash tests
combine named crash points (``EXPORTER_TEST_CRASH_AT``: one rank dies after its files are
written while the other is still in the engine's write, or before it writes at all) with a
kill at a random moment, damage the newest step, restart until done and compare every
tensor of the final step (model, optimizer, per-rank RNG states, data position) with an
uninterrupted run.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_once

from exporter import checkpoint as C
from exporter.hashing import blake3_file
from exporter import sharded
from exporter.errors import CheckpointError, UsageError
from exporter.training import train

STEPS = 8
ARGS = ["--steps", str(STEPS), "--every", "1", "--keep", "2", "--seed", "3", "--batch-size", "8", "--dataset-size", "16"]
KINDS = {
    "ddp": ["--nproc", "2", "--strategy", "ddp"],
    "fsdp": ["--nproc", "2", "--strategy", "fsdp"],
    "flax": ["--framework", "flax", "--devices", "2"],
}


def _env(cache: Path, crash: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(C.CRASH_ENV, None)
    if crash is not None:
        env[C.CRASH_ENV] = crash
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)  # the flax runs share their compiled programs
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _cmd(ckpt_dir: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "exporter", "train", "mlp", "--ckpt-dir", str(ckpt_dir), "--json", *args]


def _run(ckpt_dir: Path, args: list[str], cache: Path, crash: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(ckpt_dir, args), env=_env(cache, crash), capture_output=True, text=True, timeout=300)


def _kill_at_random(ckpt_dir: Path, args: list[str], cache: Path, after: int, seed: int) -> None:
    """Start the job and SIGKILL all of it at a moment drawn from ``seed``: while step k (> ``after``)
    is being written (its temp directory exists), or just after it was committed, plus up to 20 ms."""
    rnd = random.Random(seed)
    k = rnd.randint(after + 1, STEPS - 3)  # at least 3 steps of work left: the job cannot end first
    watch = C.sharded_tmp(ckpt_dir, k) if rnd.random() < 0.5 else ckpt_dir / C.step_dirname(k)
    delay = rnd.uniform(0.0, 0.02)
    proc = subprocess.Popen(
        _cmd(ckpt_dir, args), env=_env(cache, None), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not watch.exists():
        time.sleep(0.001)
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the job ended before the kill ({watch.name}): rc {proc.returncode}\n{proc.stderr.read()[-3000:]}"


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _step_tensors(step: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor and document of a sharded step: engine tensors (full), per-rank files, state.json."""
    from safetensors.numpy import load_file

    layout = json.loads((step / C.MANIFEST).read_text())["layout"]
    if layout == "dcp":
        d = step / "dcp"
        engine = sharded.read_dcp(d, {k: k for k in sharded.dcp_tensors(d)})
    else:
        engine = {f"{i}/{k}": v for i in ("model", "optimizer") for k, v in sharded.flatten(sharded.read_orbax(step / i)).items()}
    out = {f"engine/{k}": (a.dtype.str, a.shape, a.tobytes()) for k, a in engine.items()}
    for f in sorted(step.glob("rank-*.safetensors")):
        out.update({f"{f.stem}/{k}": (a.dtype.str, a.shape, a.tobytes()) for k, a in load_file(f).items()})
    for f in [*sorted(step.glob("rank-*.json")), step / C.STATE_JSON]:
        out[f.name] = ("json", (), f.read_bytes())
    return out


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _step_tensors(a), _step_tensors(b)
    assert ta.keys() == tb.keys()
    assert len([k for k in ta if k.startswith("engine/optim")]) >= 4 or any(k.startswith("engine/optimizer/") for k in ta)
    assert any("torch/cpu" in k or "jax/key" in k for k in ta)  # the RNG states are compared too
    different = sorted(k for k in ta if ta[k] != tb[k])
    assert not different, different


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "xla-cache"


def _reference(tmp_path_factory: pytest.TempPathFactory, kind: str, cache: Path) -> Path:
    def build(d: Path) -> dict:
        proc = _run(d, ARGS + KINDS[kind], cache)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    d, _ = shared_once(tmp_path_factory, f"distributed-reference-{kind}", build)
    return d


# (named crash, steps right after it, a leftover expected) — then a kill at a random moment
CRASHES = {
    "ddp": ("written:3@1", ["step-00000001", "step-00000002"]),  # rank 1 wrote + hashed its shard, dies before reporting
    "fsdp": ("engine:3@0", ["step-00000001", "step-00000002"]),  # rank 0 dies before its shard; rank 1 is in dcp.save
    "flax": ("written:3", ["step-00000001", "step-00000002"]),  # orbax has written every device's shards, no manifest
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_sigkill_anywhere_then_resume_is_bit_exact(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, cache: Path, kind: str) -> None:
    args = ARGS + KINDS[kind]
    crashed = tmp_path / "crashed"
    point, expected = CRASHES[kind]
    proc = _run(crashed, args, cache, point)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert [p.name for p in C.step_dirs(crashed)] == expected, proc.stderr[-3000:]
    leftover = C.sharded_tmp(crashed, 3)
    assert leftover.is_dir() and not (leftover / C.MANIFEST).exists()  # written (partly), never committed
    if kind == "fsdp":
        assert (leftover / "rank-00001.json").is_file()  # rank 1 got further than rank 0

    _kill_at_random(crashed, args, cache, after=3, seed=zlib.crc32(kind.encode()))
    steps = C.step_dirs(crashed)
    assert len(steps) >= 2 and all(not C.verify_checkpoint(p) for p in steps)  # committed = complete

    # Damage the newest step: the restart names it, moves it aside and resumes from the one before.
    newest = steps[-1]
    shard = sorted((newest / ("dcp" if kind != "flax" else "model")).rglob("*"), key=lambda f: -f.stat().st_size if f.is_file() else 0)[0]
    _flip_middle_byte(shard)
    proc = _run(crashed, args, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping corrupt or partial checkpoint {newest}" in proc.stderr and "blake3 mismatch" in proc.stderr
    assert (crashed / f"{newest.name}.corrupt").is_dir()
    result = json.loads(proc.stdout)
    assert result["ok"] and result["final_step"] == STEPS and result["start_step"] == int(steps[-2].name[5:])
    assert not [p for p in crashed.iterdir() if p.name.startswith(".tmp-")]
    assert [p.name for p in C.step_dirs(crashed)] == [f"step-{STEPS - 1:08d}", f"step-{STEPS:08d}"]

    ref = _reference(tmp_path_factory, kind, cache)
    _assert_same(crashed / f"step-{STEPS:08d}", ref / f"step-{STEPS:08d}")
    assert result["params_sha256"] == json.loads((ref.parent / f"distributed-reference-{kind}.json").read_text())["params_sha256"]


def _copy_of_reference(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, kind: str, cache: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(_reference(tmp_path_factory, kind, cache), d)
    return d


def _train_to(d: Path, steps: int, kind_args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    proc = _run(d, [*ARGS[:1], str(steps), *ARGS[2:], *kind_args], cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torch_reshards_2_to_1_to_2_with_identical_tensors(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, cache: Path) -> None:
    d = _copy_of_reference(tmp_path, tmp_path_factory, "fsdp", cache)
    one = _train_to(d, STEPS + 1, ["--nproc", "1", "--strategy", "ddp"], cache)
    assert "resharded step-00000008 from 2 rank(s) (fsdp) to 1 (ddp): model and optimizer tensors verified identical" in one.stderr
    two = _train_to(d, STEPS + 2, ["--nproc", "2", "--strategy", "fsdp"], cache)
    assert "resharded step-00000009 from 1 rank(s) (ddp) to 2 (fsdp): model and optimizer tensors verified identical" in two.stderr
    r = json.loads(two.stdout)
    assert r["ok"] and r["start_step"] == STEPS + 1 and r["nproc"] == 2 and r["strategy"] == "fsdp"
    assert json.loads((d / f"step-{STEPS + 2:08d}" / "rank-00001.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_under_torchrun_rank0_holds_the_lock_and_decides(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, cache: Path) -> None:
    """The ranks of a job started by another launcher (torchrun's environment, no --nproc): rank 0 cleans and decides."""
    import socket

    d = _copy_of_reference(tmp_path, tmp_path_factory, "ddp", cache)
    C.sharded_tmp(d, STEPS + 1).mkdir()  # a leftover of a crashed write
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**_env(cache, None), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        args = [*ARGS[:1], str(STEPS + 1), *ARGS[2:], "--strategy", "ddp"]
        procs.append(subprocess.Popen(_cmd(d, args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "removed leftover" in outs[0][1] and f"resuming mlp (torch) from {d / 'step-00000008'}" in outs[0][1]
    assert "removed leftover" not in outs[1][1]  # only rank 0 touches the directory
    results = [json.loads(o) for o, _ in outs]
    assert results[0] == {**results[1], "seconds": results[0]["seconds"], "cleaned": results[0]["cleaned"]}
    assert results[0]["start_step"] == STEPS and results[0]["nproc"] == 2 and results[0]["strategy"] == "ddp"
    assert [p.name for p in C.step_dirs(d)] == [f"step-{STEPS:08d}", f"step-{STEPS + 1:08d}"]


@pytest.mark.slow
def test_flax_reshards_2_to_1_devices(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, cache: Path) -> None:
    d = _copy_of_reference(tmp_path, tmp_path_factory, "flax", cache)
    one = _train_to(d, STEPS + 1, ["--framework", "flax", "--devices", "1"], cache)
    assert "resharded step-00000008 from 2 devices to 1: model and optimizer tensors verified identical" in one.stderr
    assert json.loads(one.stdout)["devices"] == 1


@pytest.mark.slow
def test_export_from_sharded_steps_passes_parity(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, cache: Path) -> None:
    import exporter

    ref = _reference(tmp_path_factory, "fsdp", cache)
    report = exporter.export("mlp", checkpoint=ref, framework="torch", out=tmp_path / "out", intra_op_threads=1)
    assert report, report.failures()
    info = exporter.api.inspect(ref)  # the newest step of the checkpoint directory, consolidated
    assert info.to_dict()["format"] == "exporter-checkpoint"
    final = C.model_checkpoint(ref)
    assert final.layout == "dcp" and final.path.name == f"step-{STEPS:08d}"
    assert C.state_sha256(final.group("model")) == json.loads((ref.parent / "distributed-reference-fsdp.json").read_text())["params_sha256"]


def test_plain_dcp_save_exports_and_passes_parity(tmp_path: Path) -> None:
    """A directory written by torch.distributed.checkpoint.save outside exporter: sniffed, consolidated, exported."""
    import torch
    import torch.distributed.checkpoint as dcp

    import exporter
    from exporter import rebuild, state
    from exporter.models import registry

    spec = registry.get("mlp")
    module = rebuild.torch_module(spec, rebuild.init_state(spec, seed=5))
    opt = torch.optim.AdamW(module.parameters())
    module(torch.randn(2, 20)).sum().backward()
    opt.step()
    d = tmp_path / "plain"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": module.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, checkpoint_id=str(d))
    assert state.sniff(d) == "dcp"
    loaded = state.read_state(d)
    assert sorted(loaded.arrays) == sorted(module.state_dict())  # the "model" entry, without its prefix
    for k, v in module.state_dict().items():
        assert loaded.arrays[k].tobytes() == v.detach().numpy().tobytes(), k
    assert state.inspect_state(d).sha256 == loaded.sha256
    report = exporter.export("mlp", checkpoint=d, framework="torch", out=tmp_path / "out", intra_op_threads=1)
    assert report, report.failures()
    dst = exporter.api.convert(d, tmp_path / "mlp.safetensors")
    assert dst and sorted(state.load_state(tmp_path / "mlp.safetensors")) == sorted(module.state_dict())


def test_sharded_step_protocol_and_damage(tmp_path: Path) -> None:
    """commit_sharded publishes only what every rank reported; verification checks every shard file."""
    root = tmp_path / "ck"
    tmp = C.sharded_tmp(root, 5)
    (tmp / "dcp").mkdir(parents=True)
    files = {}
    for rank in (0, 1):
        files.update(C.write_rank_files(tmp, rank, {"rank": rank}, {"x": np.arange(3, dtype=np.int64) + rank}))
        (tmp / "dcp" / f"shard-{rank + 1:05d}.bin").write_bytes(bytes([rank]) * 100)
        files.update(C.hash_files(tmp, [f"dcp/shard-{rank + 1:05d}.bin"]))
    kw = dict(layout="dcp", model="mlp", framework="torch", tensors={"model": {}}, state={"step": 5}, info={"world_size": 2})
    (tmp / "dcp" / "stray.bin").write_bytes(b"?")
    with pytest.raises(CheckpointError, match=r"(?s)not complete.*stray\.bin: in .* but no rank reported"):
        C.commit_sharded(root, 5, files=files, **kw)
    (tmp / "dcp" / "stray.bin").unlink()
    missing = {**files, "dcp/shard-00003.bin": {"bytes": 1, "blake3": "0" * 64}}
    with pytest.raises(CheckpointError, match=r"shard-00003\.bin: reported by a rank but not in"):
        C.commit_sharded(root, 5, files=missing, **kw)
    assert C.step_dirs(root) == []  # nothing was published
    step = C.commit_sharded(root, 5, files=files, **kw)
    assert step == root / "step-00000005" and not tmp.exists() and C.verify_checkpoint(step) == []
    ck = C.load_sharded_state(step, (1,))
    assert ck.layout == "dcp" and ck.state == {"step": 5} and ck.ranks[1][1]["x"].tolist() == [1, 2, 3]
    info = C.list_checkpoints(root)[0]
    assert info.valid and info.total_bytes > 200
    m = json.loads((step / "manifest.json").read_text())
    assert (m["format_version"], m["hash"], m["layout"]) == (3, "blake3", "dcp") and "manifest_sha256" not in m
    assert all(set(e) == {"bytes", "blake3"} for e in m["files"].values())
    assert m["files"]["dcp/shard-00002.bin"]["blake3"] == blake3_file(step / "dcp" / "shard-00002.bin")
    assert m["files"]["rank-00001.safetensors"]["blake3"] == blake3_file(step / "rank-00001.safetensors")
    _flip_middle_byte(step / "dcp" / "shard-00002.bin")
    assert C.verify_checkpoint(step) == ["dcp/shard-00002.bin: blake3 mismatch (content altered or damaged)"]
    (step / "rank-00001.json").unlink()
    assert "rank-00001.json: missing" in C.verify_checkpoint(step)
    with pytest.raises(CheckpointError, match="rank-00001.json: missing"):
        C.load_sharded_state(step, (1,))


def test_sharded_sha256_manifest_still_loads_and_catches_damage(tmp_path: Path) -> None:
    """A format 2 step (sha256 digests, from before the manifest named its hash) verifies and loads."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("legacy_checkpoint", Path(__file__).parent / "data" / "legacy_checkpoint.py")
    legacy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(legacy)
    root = tmp_path / "ck"
    tmp = C.sharded_tmp(root, 3)
    (tmp / "dcp").mkdir(parents=True)
    files = C.write_rank_files(tmp, 0, {"rank": 0}, {"x": np.arange(4, dtype=np.int32)})
    (tmp / "dcp" / "shard-00001.bin").write_bytes(bytes(range(200)))
    files.update(C.hash_files(tmp, ["dcp/shard-00001.bin"]))
    kw = dict(layout="dcp", model="mlp", framework="torch", tensors={"model": {}}, state={"step": 3}, info={"world_size": 1})
    step = C.commit_sharded(root, 3, files=files, **kw)
    old = legacy.to_legacy(step)
    assert old["format_version"] == 2 and old["layout"] == "dcp" and "hash" not in old
    assert C.verify_checkpoint(step) == []
    ck = C.load_sharded_state(step, (0,))
    assert ck.layout == "dcp" and ck.state == {"step": 3} and ck.ranks[0][1]["x"].tolist() == [0, 1, 2, 3]
    assert C.latest_checkpoint(root).path == step
    _flip_middle_byte(step / "rank-00000.safetensors")
    assert C.verify_checkpoint(step) == ["rank-00000.safetensors: sha256 mismatch (content altered or damaged)"]


def test_distributed_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"(?s)batch_size \(6\) must be a multiple of nproc \(4\).*nproc starts torch\.distributed ranks"):
        train("mlp", tmp_path / "a", 1, framework="flax", nproc=4, batch_size=6)
    with pytest.raises(UsageError, match=r"devices is for framework='flax'"):
        train("mlp", tmp_path / "a", 1, devices=2)
    with pytest.raises(UsageError, match=r"strategy applies to distributed torch runs"):
        train("mlp", tmp_path / "a", 1, strategy="fsdp")
    with pytest.raises(UsageError, match=r"strategy must be None or one of ddp, fsdp"):
        train("mlp", tmp_path / "a", 1, nproc=2, strategy="zero")
    with pytest.raises(UsageError, match=r"nproc must be None or an integer >= 1"):
        train("mlp", tmp_path / "a", 1, nproc=0)
    assert not (tmp_path / "a").exists()
    # a single-process run is not resumed by a distributed one (nor the reverse): it says how to resume
    train("mlp", tmp_path / "single", 1, every=1, keep=1)
    with pytest.raises(CheckpointError, match=r"holds a single-process run .*resume it without --nproc/--devices"):
        train("mlp", tmp_path / "single", 2, nproc=2)
