"""exporter.checkpoint: durable/atomic step directories, manifest hashes, retention, fallback, the format."""
from __future__ import annotations

import errno
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from exporter import checkpoint as C
from exporter import streamio, treecodec
from exporter.hashing import blake3_bytes, blake3_file, sha256_bytes
from exporter.rng import restore_rng
from exporter.errors import CheckpointCorruptError, CheckpointError, StateFileError, StateMismatchError, UsageError


def _model(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "hidden.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "hidden.bias": rng.standard_normal(4).astype(np.float32),
    }


def _save(root: Path, step: int, **kw) -> Path:
    tensors = {
        "model": _model(step),
        "optimizer": {
            "step": np.array(float(step), np.float32),  # 0-d must stay 0-d
            "flags": np.array([True, False]),
            "ids": np.arange(5, dtype=np.int64),
            "half": np.ones((2, 2), np.float16),
            "empty": np.zeros((0, 3), np.float32),
        },
    }
    return C.save_checkpoint(
        root, step, model=kw.pop("model", "mlp"), framework="torch", tensors=tensors, state={"step": step, "note": "x"}, **kw
    )


def _flip_byte(path: Path, tensor: str = "hidden.bias") -> None:
    """Flip one byte inside ``tensor``'s data (offsets from the safetensors header)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + n])[tensor]["data_offsets"]
    data[8 + n + (begin + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ---------------------------------------------------------------------------------------
# layout and round trip
# ---------------------------------------------------------------------------------------
def test_roundtrip_layout_and_manifest(tmp_path: Path) -> None:
    path = _save(tmp_path, 7)
    assert path == tmp_path / "step-00000007"
    assert _names(path) == ["manifest.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    ck = C.load_checkpoint(path)
    assert (ck.step, ck.model, ck.framework) == (7, "mlp", "torch")
    assert ck.state == {"step": 7, "note": "x"}
    for name, a in _model(7).items():
        b = ck.group("model")[name]
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    opt = ck.group("optimizer")
    assert opt["step"].shape == () and opt["step"].dtype == np.float32
    assert opt["flags"].dtype == np.bool_ and opt["half"].dtype == np.float16 and opt["empty"].shape == (0, 3)
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "exporter-checkpoint" and m["format_version"] == 3
    assert (m["hash"], m["layout"]) == ("blake3", "files") and "manifest_sha256" not in m
    assert set(m["files"]) == {"model.safetensors", "optimizer.safetensors", "state.json"}
    assert m["tensors"]["model.safetensors"]["hidden.weight"]["shape"] == [4, 3]
    assert all(len(e["blake3"]) == 64 and "sha256" not in e for e in m["tensors"]["optimizer.safetensors"].values())
    # every file digest is what b3sum prints for the file as it lies on disk
    assert all(m["files"][f]["blake3"] == blake3_file(path / f) for f in m["files"])
    assert C.verify_checkpoint(path) == []
    assert C.list_checkpoints(tmp_path)[0].valid


def test_files_are_plain_safetensors_and_load_as_views(tmp_path: Path) -> None:
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    path = _save(tmp_path, 2)
    data = (path / "optimizer.safetensors").read_bytes()
    stored = st_load(data)  # the reference reader opens them, and the streamed writer wrote its bytes
    assert data == st_save(stored, metadata={"format": "exporter-checkpoint"})
    opt = C.load_checkpoint(path).group("optimizer")
    assert all(np.array_equal(opt[k], v) and opt[k].dtype == v.dtype and opt[k].shape == v.shape for k, v in stored.items())
    # loaded tensors are views of the one buffer the file was read (and hashed) into: no copies
    assert opt["ids"].base is not None and opt["ids"].base is opt["half"].base and opt["ids"].flags.writeable
    assert opt["ids"].base.nbytes == len(data)


def test_is_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path / "ck", 1)
    assert C.is_checkpoint(tmp_path / "ck")
    assert C.is_checkpoint(tmp_path / "ck" / "step-00000001")
    assert not C.is_checkpoint(tmp_path / "ck" / "step-00000001" / "model.safetensors")
    assert not C.is_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert not C.is_checkpoint(tmp_path / "empty")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"format": "exporter-bundle"}))
    assert not C.is_checkpoint(bundle)
    # a directory of damaged steps still counts, so that loading it explains the damage
    broken = tmp_path / "broken" / "step-00000003"
    broken.mkdir(parents=True)
    assert C.is_checkpoint(tmp_path / "broken")
    with pytest.raises(CheckpointCorruptError, match="manifest.json is missing"):
        with pytest.warns(C.CheckpointWarning, match="no valid checkpoint left"):
            C.load_model_state(tmp_path / "broken")


def test_load_model_state_dir_and_step(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    newest = C.load_model_state(tmp_path)
    assert np.array_equal(newest["hidden.weight"], _model(2)["hidden.weight"])
    first = C.load_model_state(tmp_path / "step-00000001")
    assert np.array_equal(first["hidden.weight"], _model(1)["hidden.weight"])
    assert set(first) == {"hidden.weight", "hidden.bias"}


def test_load_model_state_other_model_names_both(tmp_path: Path) -> None:
    _save(tmp_path, 1, model="mlp")
    with pytest.raises(StateMismatchError, match=r"trained for model 'mlp', not 'cnn'"):
        C.load_model_state(tmp_path, model="cnn")


def test_no_checkpoint_in_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        C.load_model_state(tmp_path)
    assert C.latest_checkpoint(tmp_path) is None


def test_existing_step_is_not_overwritten(tmp_path: Path) -> None:
    _save(tmp_path, 3)
    before = (tmp_path / "step-00000003" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        _save(tmp_path, 3)
    assert (tmp_path / "step-00000003" / "model.safetensors").read_bytes() == before


# ---------------------------------------------------------------------------------------
# corruption -> fallback with a warning; explicit load -> CheckpointCorruptError
# ---------------------------------------------------------------------------------------
def _two(tmp_path: Path) -> tuple[Path, Path]:
    return _save(tmp_path, 1), _save(tmp_path, 2)


@pytest.mark.parametrize(
    "damage, why",
    [
        ("truncate", r"model\.safetensors: \d+ bytes, expected \d+ \(truncated"),
        ("flip", r"tensor 'hidden\.bias' blake3 mismatch"),
        ("missing_manifest", r"manifest\.json is missing"),
        ("missing_file", r"optimizer\.safetensors: missing"),
        ("tampered_manifest", r"does not match its own blake3"),
        ("garbage_manifest", r"manifest\.json cannot be parsed"),
        ("state_json", r"state\.json: blake3 mismatch"),
    ],
)
def test_corrupt_newest_falls_back(tmp_path: Path, damage: str, why: str) -> None:
    old, new = _two(tmp_path)
    if damage == "truncate":
        f = new / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-10])
    elif damage == "flip":
        _flip_byte(new / "model.safetensors")
    elif damage == "missing_manifest":
        (new / "manifest.json").unlink()
    elif damage == "missing_file":
        (new / "optimizer.safetensors").unlink()
    elif damage == "tampered_manifest":
        m = json.loads((new / "manifest.json").read_text())
        m["step"] = 2
        m["model"] = "cnn"  # still valid JSON, still the right step: only the self-hash catches it
        (new / "manifest.json").write_text(json.dumps(m))
    elif damage == "garbage_manifest":
        (new / "manifest.json").write_text("{not json")
    elif damage == "state_json":
        (new / "state.json").write_text(json.dumps({"step": 2, "note": "y"}, indent=1))
    with pytest.warns(C.CheckpointWarning, match=r"step-00000002.*" + why) as rec:
        ck = C.latest_checkpoint(tmp_path)
    assert ck is not None and ck.path == old
    assert "using step-00000001 instead" in str(rec[0].message)
    with pytest.warns(C.CheckpointWarning, match="step-00000002"):
        state = C.load_model_state(tmp_path)
    assert np.array_equal(state["hidden.bias"], _model(1)["hidden.bias"])
    with pytest.raises(CheckpointCorruptError, match=why):
        C.load_checkpoint(new)
    with pytest.raises(CheckpointCorruptError, match="step-00000002"):
        C.load_model_state(new)
    assert C.verify_checkpoint(old) == []
    assert not C.list_checkpoints(tmp_path)[-1].valid


def test_flipped_byte_names_the_tensor(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    _flip_byte(path / "model.safetensors")
    problems = C.verify_checkpoint(path)
    assert "model.safetensors: blake3 mismatch (content altered or damaged)" in problems
    assert "model.safetensors: tensor 'hidden.bias' blake3 mismatch (content altered or damaged)" in problems
    assert not any("hidden.weight" in p for p in problems)


def test_every_checkpoint_corrupt_is_an_error(tmp_path: Path) -> None:
    old, new = _two(tmp_path)
    _flip_byte(old / "model.safetensors")
    (new / "manifest.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.CheckpointWarning)
        with pytest.raises(CheckpointCorruptError, match=r"no valid checkpoint(.|\n)*step-00000001(.|\n)*step-00000002"):
            C.latest_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------
# full disk: precheck and ENOSPC mid-write leave the previous checkpoint intact
# ---------------------------------------------------------------------------------------
def test_free_space_precheck(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, 1)
    real = shutil.disk_usage

    def tiny(path):  # noqa: ANN001
        u = real(path)
        return type(u)(u.total, u.total - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", tiny)
    with pytest.raises(CheckpointError, match=r"not enough free space(.|\n)*step-00000001 is intact"):
        _save(tmp_path, 2)
    assert _names(tmp_path) == ["step-00000001"]
    assert C.verify_checkpoint(tmp_path / "step-00000001") == []


def test_short_of_space_drops_what_retention_would_drop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step)
    real = shutil.disk_usage

    def full_while_old_ones_exist(path):  # noqa: ANN001
        u = real(path)
        crowded = (tmp_path / "step-00000001").exists() or (tmp_path / "step-00000002").exists()
        return type(u)(u.total, u.used, 1000 if crowded else u.free)

    monkeypatch.setattr(shutil, "disk_usage", full_while_old_ones_exist)
    with pytest.raises(CheckpointError, match="not enough free space"):
        _save(tmp_path, 4, keep=4)  # retention would drop nothing: nothing removed, nothing written
    assert len(C.step_dirs(tmp_path)) == 3
    _save(tmp_path, 4, keep=2)  # steps 1 and 2 would go after the write anyway: they go first
    assert _names(tmp_path) == ["step-00000003", "step-00000004"]


def test_short_of_space_never_touches_an_unverified_newest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for step in (1, 2):
        _save(tmp_path, step)
    _flip_byte(tmp_path / "step-00000002" / "model.safetensors")  # step 1 is the last valid one
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type(real(p))(1 << 30, 1 << 30, 10))
    with pytest.raises(CheckpointError, match="not enough free space"):
        _save(tmp_path, 3, keep=1)
    assert _names(tmp_path) == ["step-00000001", "step-00000002"]


def test_enospc_during_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    _save(tmp_path, 1)
    real = streamio._write_all
    calls = []

    def full(fd: int, data: memoryview) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        if len(set(calls)) == 2:  # the second file: half of it reaches the disk, then it is full
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(streamio, "_write_all", full)
    with pytest.raises(CheckpointError, match=r"disk full(.|\n)*partial write was removed(.|\n)*step-00000001 is intact"):
        _save(tmp_path, 2, keep=1)
    assert _names(tmp_path) == ["step-00000001"]  # no step-2, no temp dir, step-1 not pruned
    assert C.latest_checkpoint(tmp_path).step == 1


# ---------------------------------------------------------------------------------------
# retention and temp cleanup
# ---------------------------------------------------------------------------------------
def test_retention_keep_last_and_every_kth(tmp_path: Path) -> None:
    for step in range(1, 11):
        _save(tmp_path, step, keep=2, keep_every=4)
    assert _names(tmp_path) == ["step-00000004", "step-00000008", "step-00000009", "step-00000010"]


def test_retention_keeps_all_without_keep(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert len(C.step_dirs(tmp_path)) == 3


def test_prune_never_removes_the_protected_or_newer_dirs(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step)
    stray = tmp_path / "step-00000009"  # a newer directory without a manifest: not ours to judge
    stray.mkdir()
    removed = C.prune(tmp_path, keep=1, protect=tmp_path / "step-00000002")
    assert [p.name for p in removed] == ["step-00000001"]
    assert _names(tmp_path) == ["step-00000002", "step-00000003", "step-00000009"]


def test_clean_removes_leftover_temp_dirs(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    (tmp_path / ".tmp-step-00000002.abc").mkdir()
    (tmp_path / ".tmp-step-00000002.abc" / "model.safetensors").write_bytes(b"half")
    removed = C.clean(tmp_path)
    assert [p.name for p in removed] == [".tmp-step-00000002.abc"]
    assert _names(tmp_path) == ["step-00000001"]


def test_state_sha256_sensitive_to_names_dtype_bytes() -> None:
    a = {"w": np.zeros(3, np.float32)}
    assert C.state_sha256(a) == C.state_sha256({"w": np.zeros(3, np.float32)})
    assert C.state_sha256(a) != C.state_sha256({"v": np.zeros(3, np.float32)})
    assert C.state_sha256(a) != C.state_sha256({"w": np.zeros(3, np.float64)})
    assert C.state_sha256(a) != C.state_sha256({"w": np.array([0, 0, 1], np.float32)})


# ---------------------------------------------------------------------------------------
# the on-disk format: a checkpoint written by an earlier exporter still loads, and today's
# code writes the same bytes from the same content
# ---------------------------------------------------------------------------------------
GOLDEN = Path(__file__).parent / "data" / "checkpoint-v1"


def _golden_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_checkpoint_v1", GOLDEN.parent / "make_checkpoint_v1.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_golden_v1_checkpoint_loads() -> None:
    import random

    import jax.numpy as jnp
    import torch

    step_dir = GOLDEN / "step-00000003"
    assert C.verify_checkpoint(step_dir) == []
    assert C.is_checkpoint(GOLDEN) and [i.valid for i in C.list_checkpoints(GOLDEN)] == [True]
    ck = C.load_checkpoint(step_dir)
    assert (ck.step, ck.model, ck.framework) == (3, "mlp", "torch")
    assert C.latest_checkpoint(GOLDEN).path == step_dir
    model = C.load_model_state(GOLDEN, model="mlp")
    assert np.array_equal(model["hidden.weight"], np.arange(12, dtype=np.float32).reshape(4, 3) / 8)
    assert ck.group("model_extra")["hidden.num_batches_tracked"].shape == ()

    opt = treecodec.decode_tree(ck.state["optimizer"], ck.group("optimizer"))
    s0 = opt["optimizer"]["state"][0]
    assert list(opt["optimizer"]["state"]) == [0, 1] and opt["optimizer"]["state"][1] == {}
    assert s0["step"].dtype == torch.float32 and s0["step"].item() == 3.0
    assert s0["half"].dtype == torch.bfloat16 and s0["half"].tolist() == [1.0, 1.0]
    assert opt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert opt["scheduler"] == {"last_epoch": 3, "_last_lr": [0.00099]}
    assert math.isnan(treecodec.decode_tree(ck.state["loss"], {}))
    odd = treecodec.decode_tree(ck.state["odd"], {})
    assert odd == {"t": (1, 2.5), 7: np.float32(1.5), "inf": math.inf, "__x": None} and type(odd[7]) is np.float32

    template = ({"count": jnp.asarray(np.int32(0))}, {"mu": {"w": jnp.zeros((4, 3), jnp.float32)}})
    optax_state = treecodec.restore_pytree(template, ck.state["optax"], ck.group("optimizer"))
    assert int(optax_state[0]["count"]) == 3 and np.array_equal(np.asarray(optax_state[1]["mu"]["w"]), model["hidden.weight"])

    # the stored RNG states are those right after seeding with 7 (the data generator: 11)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = (random.random(), np.random.random(), torch.rand(2).tolist(), np.random.default_rng(11).integers(1 << 30))
    gen = np.random.default_rng(0)
    restore_rng(ck.state["rng"], ck.group("rng"), {"data": gen})
    assert (random.random(), np.random.random(), torch.rand(2).tolist(), gen.integers(1 << 30)) == expected


def test_golden_v1_content_is_written_in_the_same_bytes_with_blake3(tmp_path: Path) -> None:
    """Format 3 changed only the manifest's hash: the files hold the bytes format 1 wrote."""
    written = _golden_module().write(tmp_path)
    stored = GOLDEN / "step-00000003"
    assert _names(written) == _names(stored)
    for f in sorted(stored.iterdir()):
        if f.name != "manifest.json":
            assert (written / f.name).read_bytes() == f.read_bytes(), f.name
    new, old = (json.loads((d / "manifest.json").read_text()) for d in (written, stored))
    volatile = {"created", "versions", "manifest_sha256", "manifest_blake3"}  # a timestamp, library versions, their hash
    # the v1 manifest with every sha256 swapped for the BLAKE3 of the same bytes is today's manifest
    loaded = C.load_checkpoint(stored)
    expect = {k: v for k, v in old.items() if k not in volatile} | {"format_version": 3, "hash": "blake3", "layout": "files"}
    expect["files"] = {n: {"bytes": e["bytes"], "blake3": blake3_file(stored / n)} for n, e in old["files"].items()}
    expect["tensors"] = {
        f: {n: {"dtype": e["dtype"], "shape": e["shape"], "blake3": blake3_bytes(C._tensor_bytes(loaded.tensors[f.removesuffix(".safetensors")][n]))}
            for n, e in entries.items()}
        for f, entries in old["tensors"].items()
    }  # fmt: skip
    assert {k: v for k, v in new.items() if k not in volatile} == expect
    assert all(sha256_bytes(C._tensor_bytes(loaded.tensors["model"][n])) == e["sha256"] for n, e in old["tensors"]["model.safetensors"].items())


GOLDEN_V3 = Path(__file__).parent / "data" / "checkpoint-v3"


def test_golden_v3_checkpoint_loads_and_is_written_identically(tmp_path: Path) -> None:
    step_dir = GOLDEN_V3 / "step-00000003"
    assert C.verify_checkpoint(step_dir) == []
    v3, v1 = C.load_checkpoint(step_dir), C.load_checkpoint(GOLDEN / "step-00000003")
    assert v3.state == v1.state and set(v3.tensors) == set(v1.tensors)
    for group, arrays in v1.tensors.items():
        assert set(v3.tensors[group]) == set(arrays)
        for name, a in arrays.items():
            b = v3.tensors[group][name]
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (group, name)
    written = _golden_module().write(tmp_path)
    for f in sorted(step_dir.iterdir()):
        if f.name != "manifest.json":
            assert (written / f.name).read_bytes() == f.read_bytes(), f.name
    new, old = (json.loads((d / "manifest.json").read_text()) for d in (written, step_dir))
    volatile = {"created", "versions", "manifest_blake3"}
    assert {k: v for k, v in new.items() if k not in volatile} == {k: v for k, v in old.items() if k not in volatile}


# ---------------------------------------------------------------------------------------
# manifests from before format 3 (sha256, no "hash" entry) still load and still catch damage
# ---------------------------------------------------------------------------------------
def _legacy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("legacy_checkpoint", GOLDEN.parent / "legacy_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sha256_manifest_loads_and_verifies(tmp_path: Path) -> None:
    path = _save(tmp_path, 4)
    old = _legacy().to_legacy(path)
    assert old["format_version"] == 1 and "hash" not in old and "layout" not in old
    assert C.verify_checkpoint(path) == []
    ck = C.load_checkpoint(path)
    assert ck.layout == "files" and ck.state == {"step": 4, "note": "x"}
    assert all(np.array_equal(ck.group("model")[k], v) for k, v in _model(4).items())
    assert C.latest_checkpoint(tmp_path).path == path and C.list_checkpoints(tmp_path)[0].valid


@pytest.mark.parametrize(
    "damage, why",
    [
        ("flip", r"model\.safetensors: tensor 'hidden\.bias' sha256 mismatch"),
        ("state_json", r"state\.json: sha256 mismatch"),
        ("tampered_manifest", r"does not match its own sha256"),
        ("names_blake3", r"names hash 'blake3'; this exporter knows blake3, sha256 for format_version 1"),
    ],
)
def test_sha256_manifest_damage_is_found(tmp_path: Path, damage: str, why: str) -> None:
    path = _save(tmp_path, 1)
    _legacy().to_legacy(path)
    if damage == "flip":
        _flip_byte(path / "model.safetensors")
    elif damage == "state_json":
        (path / "state.json").write_text(json.dumps({"step": 1, "note": "y"}, indent=1))
    else:
        m = json.loads((path / "manifest.json").read_text())
        if damage == "tampered_manifest":
            m["model"] = "cnn"
        else:  # a format 1 manifest claiming another hash is not one exporter wrote
            m["hash"] = "blake3"
        (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointCorruptError, match=why) as info:
        C.load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "edit, why",
    [
        ({"hash": "md5"}, r"names hash 'md5'; this exporter knows blake3, sha256 for format_version 3"),
        ({"hash": None}, r"names hash None"),
        ({"format_version": 4}, r"format_version 4; this exporter reads 1, 2, 3 \(upgrade exporter\)"),
        ({"layout": "zarr"}, r"layout 'zarr', expected files, dcp, orbax for format_version 3"),
    ],
)
def test_manifest_hash_and_version_checks(tmp_path: Path, edit: dict, why: str) -> None:
    path = _save(tmp_path, 1)
    m = json.loads((path / "manifest.json").read_text())
    m.update({k: v for k, v in edit.items() if v is not None})
    if edit.get("hash", "") is None:
        del m["hash"]
    if "layout" in edit:  # re-seal, so that only the layout is wrong
        body = {k: v for k, v in m.items() if k != "manifest_blake3"}
        m["manifest_blake3"] = blake3_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointCorruptError, match=why):
        C.load_checkpoint(path)


def test_damaged_header_with_a_valid_manifest_is_named(tmp_path: Path) -> None:
    """A file whose header is not exporter's (damage inside it) is parsed the slow way to say why."""
    path = _save(tmp_path, 1)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[20] = ord("x") if data[20] != ord("x") else ord("y")  # inside the header JSON
    f.write_bytes(bytes(data))
    problems = C.verify_checkpoint(path)
    assert problems[0] == "model.safetensors: blake3 mismatch (content altered or damaged)"
    assert len(problems) >= 2 and all(p.startswith("model.safetensors: ") for p in problems)


# ---------------------------------------------------------------------------------------
# error types: a corrupt step is a CheckpointError and a StateFileError
# ---------------------------------------------------------------------------------------
def test_corrupt_step_is_a_checkpoint_error_and_a_state_file_error(tmp_path: Path) -> None:
    import exporter

    step_dir = _save(tmp_path, 1)
    _flip_byte(step_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="corrupt or incomplete") as info:
        C.load_checkpoint(step_dir)
    assert isinstance(info.value, CheckpointCorruptError) and isinstance(info.value, StateFileError)
    assert "model.safetensors: tensor 'hidden.bias' blake3 mismatch (content altered or damaged)" in info.value.problems
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        with pytest.warns(C.CheckpointWarning):
            C.latest_checkpoint(tmp_path)
    with pytest.raises(StateFileError, match="hidden.bias"):  # exporting from it: a bad state file
        exporter.load_state(step_dir)


# ---------------------------------------------------------------------------------------
# bad arguments: a typed error naming the argument, never an assert or a bare TypeError
# ---------------------------------------------------------------------------------------
_GOOD_TENSORS = {"model": {"w": np.zeros(2, np.float32)}}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"step": -1}, r"step must be an integer >= 0 .*got -1 \(int\)"),
        ({"step": 1.5}, r"step must be an integer >= 0"),
        ({"step": "3"}, r"step must be an integer >= 0 .*got '3' \(str\)"),
        ({"step": True}, r"step must be an integer >= 0"),
        ({"keep": 0}, r"keep must be an integer >= 1 .*None to keep all.*got 0"),
        ({"keep": "2"}, r"keep must be an integer >= 1"),
        ({"keep": 2, "keep_every": 0}, r"keep_every must be None or an integer >= 1"),
        ({"keep": 2, "keep_every": 2.0}, r"keep_every must be None or an integer >= 1"),
        ({"model": ""}, r"model must be the model's registry name"),
        ({"model": None}, r"model must be the model's registry name"),
        ({"framework": "tf"}, r"framework must be one of 'torch', 'flax', got 'tf'"),
        ({"tensors": [np.zeros(2)]}, r"tensors must be a mapping of group name"),
        ({"tensors": {"optimizer": {}}}, r"tensors must hold the 'model' group"),
        ({"tensors": {**_GOOD_TENSORS, "Opt": {}}}, r"group name 'Opt' must match \^\[a-z\]"),
        ({"tensors": {**_GOOD_TENSORS, "my-rng": {}}}, r"group name 'my-rng' must match"),
        ({"tensors": {**_GOOD_TENSORS, 3: {}}}, r"group name 3 must match"),
        ({"tensors": {"model": [np.zeros(2)]}}, r"group 'model' must be a mapping of tensor name -> array"),
        ({"tensors": {"model": {"w": [1.0, 2.0]}}}, r"tensor model/w must be an array .*got \[1\.0, 2\.0\] \(list\)"),
        ({"tensors": {"model": {"w": None}}}, r"tensor model/w must be an array"),
        ({"tensors": {"model": {"w": "abc"}}}, r"tensor model/w must be an array"),
        ({"tensors": {"model": {3: np.zeros(1)}}}, r"tensor model/3: names must be non-empty str"),
        ({"tensors": {"model": {"w": np.array([object()])}}}, r"tensor model/w: dtype object cannot be stored"),
        ({"tensors": {"model": {"w": np.array(["a"])}}}, r"tensor model/w: dtype <U1 cannot be stored"),
        ({"state": [1, 2]}, r"state must be a JSON-serialisable mapping"),
        ({"state": {"x": np.float32(1)}}, r"state must be plain JSON .*encode_tree"),
        ({"state": {"x": math.nan}}, r"state must be plain JSON"),
    ],
)
def test_save_checkpoint_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"step": 1, "model": "mlp", "framework": "torch", "tensors": _GOOD_TENSORS, "state": {}, **kwargs}
    step = args.pop("step")
    with pytest.raises(UsageError, match=r"invalid arguments to save_checkpoint\(\):\n  - " + match):
        C.save_checkpoint(tmp_path / "ck", step, **args)
    assert not (tmp_path / "ck").exists()


def test_save_checkpoint_lists_every_bad_argument_capped(tmp_path: Path) -> None:
    bad = {f"t{i:02d}": [i] for i in range(30)}
    with pytest.raises(UsageError) as info:
        C.save_checkpoint(tmp_path, -1, model="mlp", framework="torch", tensors={"model": bad}, state={}, keep=0)
    err = info.value
    assert len(err.problems) == 32 and any(p.startswith("step must be") for p in err.problems)
    assert "keep must be" in str(err) and "... and 10 more tensor" in str(err)
    assert not any(tmp_path.iterdir())


def test_save_checkpoint_rejects_dtypes_it_could_not_read_back(tmp_path: Path) -> None:
    import ml_dtypes
    import torch

    with pytest.raises(UsageError, match=r"tensor optimizer/m: dtype bfloat16 cannot be stored.*float32 \(exact\)"):
        C.save_checkpoint(
            tmp_path, 1, model="mlp", framework="torch", state={},
            tensors={"model": {"w": np.zeros(1)}, "optimizer": {"m": np.zeros(2, ml_dtypes.bfloat16)}},
        )  # fmt: skip
    with pytest.raises(UsageError, match=r"tensor model/w: cannot be read as a numpy array .*detach\(\)"):
        C.save_checkpoint(tmp_path, 1, model="mlp", framework="torch", state={}, tensors={"model": {"w": torch.ones(2, requires_grad=True)}})
    assert not any(tmp_path.iterdir())


def test_save_checkpoint_accepts_numpy_ints_torch_tensors_and_other_byte_orders(tmp_path: Path) -> None:
    import torch

    big_endian = np.arange(3, dtype=">f4")
    path = C.save_checkpoint(
        tmp_path, np.int64(4), model="mlp", framework="flax", state={},
        tensors={"model": {"w": big_endian, "t": torch.arange(3), "s": np.float16(2)}},
    )  # fmt: skip
    assert path.name == "step-00000004" and C.verify_checkpoint(path) == []
    m = C.load_checkpoint(path).group("model")
    assert m["w"].dtype == np.float32 and m["w"].tolist() == [0.0, 1.0, 2.0]
    assert m["t"].dtype == np.int64 and m["s"].shape == ()


def test_save_checkpoint_into_a_file(tmp_path: Path) -> None:
    f = tmp_path / "ck"
    f.write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*ck is a file, not a directory"):
        C.save_checkpoint(f, 1, model="mlp", framework="torch", tensors=_GOOD_TENSORS, state={})
    assert f.read_text() == "not a directory"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep": 0}, r"keep must be an integer >= 1 \(how many of the newest checkpoints to keep\), got 0"),
        ({"keep": None}, r"keep must be an integer >= 1"),
        ({"keep": 1.0}, r"keep must be an integer >= 1"),
        ({"keep": 1, "keep_every": -2}, r"keep_every must be None or an integer >= 1"),
        ({"keep": 1, "protect": 7}, r"protect must be None or the path of a step directory"),
    ],
)
def test_prune_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    with pytest.raises(UsageError, match=match):
        C.prune(tmp_path, **kwargs)
    assert len(C.step_dirs(tmp_path)) == 2


def test_path_arguments(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    for call in (
        lambda: C.prune(f, keep=1),
        lambda: C.clean(f),
        lambda: C.load_checkpoint(f),
        lambda: C.latest_checkpoint(f),
        lambda: C.list_checkpoints(f),
        lambda: C.model_checkpoint(f),
        lambda: C.load_model_state(f),
    ):
        with pytest.raises(CheckpointError, match=r"file is a file, not a directory; pass a checkpoint directory"):
            call()
    with pytest.raises(CheckpointError, match=r"missing does not exist; pass a step-NNNNNNNN directory"):
        C.load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"missing does not exist"):
        C.model_checkpoint(tmp_path / "missing")
    assert C.latest_checkpoint(tmp_path / "missing") is None and C.list_checkpoints(tmp_path / "missing") == []
    assert C.clean(tmp_path / "missing") == [] and C.prune(tmp_path / "missing", keep=1) == []
    for func in (C.prune, C.clean, C.load_checkpoint, C.latest_checkpoint, C.list_checkpoints, C.model_checkpoint,
                 C.load_model_state, C.verify_checkpoint, C.is_checkpoint, C.step_dirs):  # fmt: skip
        kw = {"keep": 1} if func is C.prune else {}
        for bad in (None, 3, ""):
            with pytest.raises(UsageError, match=r"(ckpt_dir|path) must be a directory path \(a non-empty str or os\.PathLike\)"):
                func(bad, **kw)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d: C.load_checkpoint(d / "step-00000001", groups="model"), r"groups must be None or a tuple of group names such as \('model',\), got 'model'"),
        (lambda d: C.load_checkpoint(d / "step-00000001", groups=("Model",)), r"groups must name groups matching .*got \['Model'\]"),
        (lambda d: C.latest_checkpoint(d, groups=3), r"groups must be None or a tuple"),
        (lambda d: C.latest_checkpoint(d, skipped=()), r"skipped must be None or a list"),
        (lambda d: C.latest_checkpoint(d, warn="yes"), r"warn must be True or False, got 'yes' \(str\)"),
        (lambda d: C.list_checkpoints(d, verify=None), r"verify must be True or False"),
        (lambda d: C.model_checkpoint(d, model=3), r"model must be None or a registry name"),
        (lambda d: C.load_model_state(d, model=""), r"model must be None or a registry name"),
    ],
    ids=["groups-str", "groups-name", "latest-groups", "skipped", "warn", "verify", "model", "model-empty"],
)
def test_reader_bad_arguments(tmp_path: Path, call, match: str) -> None:  # noqa: ANN001
    _save(tmp_path, 1)
    with pytest.raises(UsageError, match=match):
        call(tmp_path)


def test_groups_as_list_and_subset(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    ck = C.load_checkpoint(path, groups=["optimizer"])
    assert set(ck.tensors) == {"optimizer"}
    assert set(C.latest_checkpoint(tmp_path, groups=("model",)).tensors) == {"model"}


# ---------------------------------------------------------------------------------------
# exporter.streamio: the streamed writer and the hashing reader
# ---------------------------------------------------------------------------------------
def test_streamed_safetensors_are_the_reference_writers_bytes(tmp_path: Path) -> None:
    from safetensors.numpy import save as st_save

    rng = np.random.default_rng(3)
    dtypes = list(streamio.ST_CODES)
    for trial in range(40):
        arrays = {}
        for _ in range(int(rng.integers(0, 7))):
            shape = tuple(int(d) for d in rng.integers(0, 4, size=int(rng.integers(0, 3))))
            arrays[f"t{int(rng.integers(50))}é"] = np.asarray((rng.standard_normal(shape) * 9).astype(dtypes[int(rng.integers(len(dtypes)))]))
        meta = {"format": "exporter-checkpoint"} if trial % 2 else None
        f = tmp_path / f"{trial}.safetensors"
        entry, digests = streamio.write_safetensors(f, arrays, meta, "blake3")
        data = f.read_bytes()
        assert data == st_save(arrays, metadata=meta), sorted((n, a.dtype.name, a.shape) for n, a in arrays.items())
        assert entry == {"bytes": len(data), "blake3": blake3_bytes(data)}
        assert digests == {n: blake3_bytes(np.ascontiguousarray(a).tobytes()) for n, a in arrays.items()}
        buf, digest = streamio.read_hashed(f, "sha256")
        assert digest == sha256_bytes(data) and buf.tobytes() == data
        got = streamio.views(buf, {n: (a.dtype.name, list(a.shape)) for n, a in arrays.items()}, meta)
        assert got is not None and list(got) == list(arrays)
        assert all(got[n].dtype == a.dtype and got[n].shape == a.shape and np.array_equal(got[n], a) for n, a in arrays.items())


def test_views_only_of_the_expected_header(tmp_path: Path) -> None:
    f = tmp_path / "a.safetensors"
    streamio.write_safetensors(f, {"w": np.arange(4, dtype=np.float32)}, {"format": "x"}, "blake3")
    buf, _ = streamio.read_hashed(f, "blake3")
    assert streamio.views(buf, {"w": ("float32", [4])}, {"format": "x"}) is not None
    for spec, meta in [
        ({"w": ("float32", [2, 2])}, {"format": "x"}),  # another shape
        ({"w": ("int32", [4])}, {"format": "x"}),  # another dtype
        ({"v": ("float32", [4])}, {"format": "x"}),  # another name
        ({"w": ("float32", [4])}, {"format": "y"}),  # other metadata
        ({"w": ("float32", [4]), "b": ("uint8", [0])}, {"format": "x"}),  # a tensor it lacks
    ]:
        assert streamio.views(buf, spec, meta) is None, spec
    assert streamio.views(buf[:-1], {"w": ("float32", [4])}, {"format": "x"}) is None  # truncated


def test_writeback_errors_are_raised_by_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(streamio, "SYNC_EVERY", 1 << 12)
    monkeypatch.setattr(streamio, "CHUNK", 1 << 12)

    import threading

    synced = threading.Event()
    real_write = streamio._write_all

    def failing(fd: int) -> None:
        synced.set()
        raise OSError(errno.EIO, "Input/output error")

    def write_after_the_first_writeback(fd: int, data: memoryview) -> None:
        if streamio.CHUNK < os.fstat(fd).st_size:  # the first write-back was requested: let it run
            synced.wait(60)
        real_write(fd, data)

    monkeypatch.setattr(os, "fdatasync", failing)
    monkeypatch.setattr(streamio, "_write_all", write_after_the_first_writeback)
    with pytest.raises(OSError, match="Input/output error"):
        streamio.write_blob(tmp_path / "x", b"\1" * (1 << 16), "blake3")
    monkeypatch.undo()
    # with a working disk the same writer hashes the whole stream, in order
    monkeypatch.setattr(streamio, "SYNC_EVERY", 1 << 12)
    monkeypatch.setattr(streamio, "CHUNK", 1 << 12)
    data = bytes(range(256)) * 300
    assert streamio.write_blob(tmp_path / "y", data, "blake3", fsync=True) == {"bytes": len(data), "blake3": blake3_bytes(data)}
    entry, digests = streamio.write_safetensors(tmp_path / "z", {"a": np.arange(5000.0), "b": np.ones(3000, np.int16)}, None, "blake3")
    assert entry["blake3"] == blake3_file(tmp_path / "z") and digests["a"] == blake3_bytes(np.arange(5000.0).tobytes())
