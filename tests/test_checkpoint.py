"""exporter.checkpoint: durable/atomic step directories, manifest hashes, retention, fallback, codecs."""
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
from exporter.errors import CheckpointCorruptError, CheckpointError, StateMismatchError


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
    assert m["format"] == "exporter-checkpoint" and m["format_version"] == 1
    assert set(m["files"]) == {"model.safetensors", "optimizer.safetensors", "state.json"}
    assert m["tensors"]["model.safetensors"]["hidden.weight"]["shape"] == [4, 3]
    assert all(len(e["sha256"]) == 64 for e in m["tensors"]["optimizer.safetensors"].values())
    assert C.verify_checkpoint(path) == []
    assert C.list_checkpoints(tmp_path)[0].valid


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
        ("flip", r"tensor 'hidden\.bias' sha256 mismatch"),
        ("missing_manifest", r"manifest\.json is missing"),
        ("missing_file", r"optimizer\.safetensors: missing"),
        ("tampered_manifest", r"does not match its own sha256"),
        ("garbage_manifest", r"manifest\.json cannot be parsed"),
        ("state_json", r"state\.json: sha256 mismatch"),
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
    assert "model.safetensors: sha256 mismatch (content altered or damaged)" in problems
    assert "model.safetensors: tensor 'hidden.bias' sha256 mismatch (content altered or damaged)" in problems
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
    _save(tmp_path, 1)
    real = C._write_file
    calls = []

    def full(path: Path, data: bytes) -> None:
        calls.append(path.name)
        if len(calls) == 2:
            real(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(C, "_write_file", full)
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


# ---------------------------------------------------------------------------------------
# codecs: nested state, optax pytrees, RNG states
# ---------------------------------------------------------------------------------------
def test_encode_tree_roundtrip_exact(tmp_path: Path) -> None:
    obj = {
        "state": {0: {"step": np.array(3.0, np.float32), "buf": np.arange(4.0)}, 1: {}},
        "groups": [{"lr": 0.1 + 0.2, "betas": (0.9, 0.999), "params": [0, 1], "flag": None, "on": True}],
        "odd": {"__tensor__": "not a ref", "inf": math.inf, "nan": math.nan, "neg": -math.inf},
        "scalar": np.float32(1.5),
        "big": 2**100,
    }
    tensors: dict[str, np.ndarray] = {}
    doc = C.encode_tree(obj, tensors)
    text = json.dumps(doc, allow_nan=False)  # plain JSON
    back = C.decode_tree(json.loads(text), tensors)
    assert back["state"][0]["step"].shape == () and back["state"][0]["step"].dtype == np.float32
    assert list(back["state"]) == [0, 1] and back["state"][1] == {}
    assert back["groups"][0]["betas"] == (0.9, 0.999) and isinstance(back["groups"][0]["betas"], tuple)
    assert back["groups"][0]["lr"] == 0.1 + 0.2
    assert back["odd"]["__tensor__"] == "not a ref" and back["odd"]["inf"] == math.inf
    assert math.isnan(back["odd"]["nan"])
    assert back["scalar"] == np.float32(1.5) and type(back["scalar"]) is np.float32
    assert back["big"] == 2**100
    with pytest.raises(CheckpointError, match="type builtins.object"):
        C.encode_tree({"a": [object()]}, {})


def test_torch_optimizer_and_scheduler_roundtrip_bit_exact() -> None:
    torch = pytest.importorskip("torch")

    def make() -> tuple:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 2))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return m, opt, sched

    def step(m, opt, sched, i: int) -> None:  # noqa: ANN001
        x = torch.from_numpy(np.random.default_rng(i).standard_normal((4, 5)).astype(np.float32))
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
        sched.step()

    m, opt, sched = make()
    for i in range(3):
        step(m, opt, sched, i)
    tensors: dict[str, np.ndarray] = {}
    doc = C.encode_tree({"opt": opt.state_dict(), "sched": sched.state_dict()}, tensors)
    saved_model = {k: v.clone() for k, v in m.state_dict().items()}
    doc = json.loads(json.dumps(doc))
    for i in range(3, 6):
        step(m, opt, sched, i)

    m2, opt2, sched2 = make()
    m2.load_state_dict(saved_model)
    back = C.decode_tree(doc, tensors)
    assert isinstance(back["opt"]["state"][0]["step"], torch.Tensor)
    assert back["opt"]["state"][0]["step"].shape == ()
    opt2.load_state_dict(back["opt"])
    sched2.load_state_dict(back["sched"])
    for i in range(3, 6):
        step(m2, opt2, sched2, i)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_optax_state_roundtrip_and_structure_check() -> None:
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    tx = optax.adamw(optax.exponential_decay(1e-2, 1, 0.9))
    state = tx.init(params)
    grads = jax.tree.map(lambda p: p * 0.5 + 0.1, params)
    _, state = tx.update(grads, state, params)
    doc, tensors = C.flatten_pytree(state)
    doc = json.loads(json.dumps(doc))
    back = C.restore_pytree(tx.init(params), doc, tensors)
    a_leaves, a_def = jax.tree_util.tree_flatten(state)
    b_leaves, b_def = jax.tree_util.tree_flatten(back)
    assert a_def == b_def
    for a, b in zip(a_leaves, b_leaves):
        assert isinstance(b, jax.Array) and a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(np.asarray(a), np.asarray(b))
    other = tx.init({"dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}})
    with pytest.raises(CheckpointError, match=r"saved float32\[3, 2\], expected float32\[4, 2\]"):
        C.restore_pytree(other, doc, tensors, what="optax state")
    with pytest.raises(CheckpointError, match="structure differs"):
        C.restore_pytree(optax.sgd(0.1).init(params), doc, tensors)


def test_rng_capture_restore() -> None:
    import random

    torch = pytest.importorskip("torch")
    gen = np.random.default_rng(5)
    doc, tensors = C.capture_rng({"data": gen}, torch=True)
    doc = json.loads(json.dumps(doc))

    def draw() -> tuple:
        return (random.random(), np.random.random(), gen.integers(1 << 30), torch.rand(3).tolist())

    first = draw()
    C.restore_rng(doc, tensors, {"data": gen})
    assert draw() == first
    with pytest.raises(CheckpointError, match="no state for NumPy generator 'other'"):
        C.restore_rng(doc, tensors, {"other": gen})


def test_state_sha256_sensitive_to_names_dtype_bytes() -> None:
    a = {"w": np.zeros(3, np.float32)}
    assert C.state_sha256(a) == C.state_sha256({"w": np.zeros(3, np.float32)})
    assert C.state_sha256(a) != C.state_sha256({"v": np.zeros(3, np.float32)})
    assert C.state_sha256(a) != C.state_sha256({"w": np.zeros(3, np.float64)})
    assert C.state_sha256(a) != C.state_sha256({"w": np.array([0, 0, 1], np.float32)})
