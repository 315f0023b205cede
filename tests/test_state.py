"""Saved-state I/O: every format x dtype round-trips bit-exactly; bad input is a StateFileError."""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from exporter import state as S
from exporter.errors import MissingDependencyError, StateFileError, UsageError

ALL_DTYPES = sorted(set().union(*S.FORMAT_DTYPES.values()))
ROUND_TRIP = [(f, d) for f in S.WRITE_FORMATS for d in ALL_DTYPES if d in S.FORMAT_DTYPES[f]]
UNSUPPORTED = [(f, d) for f in S.WRITE_FORMATS for d in ALL_DTYPES if d not in S.FORMAT_DTYPES[f]]
SUFFIX = {"safetensors": ".safetensors", "torch": ".pt", "npz": ".npz", "flax-msgpack": ".msgpack", "orbax": ".orbax"}


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def sample(name: str, shape: tuple[int, ...] = (3, 5), seed: int = 0) -> np.ndarray:
    """Random *bytes* viewed as the dtype: NaN payloads, subnormals, extremes all included."""
    dt = np_dtype(name)
    rng = np.random.default_rng(seed)
    if dt == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    raw = rng.integers(0, 256, size=math.prod(shape) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def assert_bit_exact(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), k
        assert got[k].flags.writeable and got[k].flags.c_contiguous, k


def bad(path: Path, match: str, **kw: object) -> StateFileError:
    with pytest.raises(StateFileError, match=match) as info:
        S.load_state(path, **kw)
    assert path.name in str(info.value), "the message must name the file"
    return info.value


def st_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt,dtype", ROUND_TRIP, ids=[f"{f}-{d}" for f, d in ROUND_TRIP])
def test_round_trip_bit_exact(tmp_path: Path, fmt: str, dtype: str) -> None:
    state = {
        "layer.weight": sample(dtype),
        "params/block/scalar": sample(dtype, (), seed=1),
        "params/block/vec": sample(dtype, (7,), seed=2),
    }
    if fmt != "orbax":  # orbax cannot store zero-size arrays (tested below)
        state["empty"] = sample(dtype, (0, 4))
    path = S.save_state(state, tmp_path / f"w{SUFFIX[fmt]}")
    assert S.sniff(path) == fmt
    assert_bit_exact(S.load_state(path), state)
    info = S.inspect_state(path)
    assert info.format == fmt
    assert {t.name: (t.dtype, t.shape) for t in info.tensors} == {k: (dtype, v.shape) for k, v in state.items()}
    assert info.total_bytes == sum(v.nbytes for v in state.values())


@pytest.mark.parametrize("fmt,dtype", UNSUPPORTED, ids=[f"{f}-{d}" for f, d in UNSUPPORTED])
def test_unsupported_dtype_for_format_is_usage_error(tmp_path: Path, fmt: str, dtype: str) -> None:
    with pytest.raises(UsageError, match=f"dtype {dtype} cannot be stored in {fmt}"):
        S.save_state({"w": sample(dtype)}, tmp_path / f"w{SUFFIX[fmt]}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", S.WRITE_FORMATS)
def test_refused_dtypes_and_values(tmp_path: Path, fmt: str) -> None:
    state = {
        "f8": np.zeros(3, ml_dtypes.float8_e4m3fn),
        "obj": np.array([1, None], dtype=object),
        "text": np.array(["a"]),
        "num": 3,
    }
    with pytest.raises(UsageError) as info:
        S.save_state(state, tmp_path / f"w{SUFFIX[fmt]}")
    msg = str(info.value)
    for fragment in ("'f8': dtype float8_e4m3fn is not supported", "'obj': dtype object", "'text': dtype <U1", "'num': is of type int, not an array"):
        assert fragment in msg


@pytest.mark.parametrize("fmt", S.WRITE_FORMATS)
def test_layout_variants_round_trip_as_values(tmp_path: Path, fmt: str) -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    state = {"transposed": base.T, "big_endian": base.astype(">f4"), "readonly": np.frombuffer(base.tobytes(), np.float32)}
    loaded = S.load_state(S.save_state(state, tmp_path / f"w{SUFFIX[fmt]}"))
    for k, v in state.items():
        assert loaded[k].dtype == np.float32 and loaded[k].dtype.isnative
        np.testing.assert_array_equal(loaded[k], v)


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "npz", "flax-msgpack"])
def test_empty_state(tmp_path: Path, fmt: str) -> None:
    assert S.load_state(S.save_state({}, tmp_path / f"w{SUFFIX[fmt]}")) == {}


def test_torch_tensors_and_nested_input(tmp_path: Path) -> None:
    import torch

    sd = {"w": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5), "p": torch.nn.Parameter(torch.ones(2))}
    nested = {"params": {"dense": {"kernel": np.ones((2, 2), np.float32)}}}
    loaded = S.load_state(S.save_state({**sd, **nested}, tmp_path / "w.safetensors"))
    assert loaded["w"].dtype == ml_dtypes.bfloat16
    assert loaded["w"].view(np.int16).tobytes() == sd["w"].view(torch.int16).numpy().tobytes()
    assert loaded["b"].dtype == np.int64 and loaded["p"].dtype == np.float32
    assert "params/dense/kernel" in loaded


def test_jax_arrays_input(tmp_path: Path) -> None:
    import jax.numpy as jnp

    x = jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)
    loaded = S.load_state(S.save_state({"x": x}, tmp_path / "w.msgpack"))
    assert loaded["x"].dtype == ml_dtypes.bfloat16 and loaded["x"].tobytes() == np.asarray(x).tobytes()


def test_safetensors_metadata(tmp_path: Path) -> None:
    path = S.save_state({"w": np.ones(2)}, tmp_path / "w.safetensors", metadata={"model": "mlp"})
    assert S.inspect_state(path).metadata == {"model": "mlp"}
    with pytest.raises(UsageError, match="metadata can only be stored in safetensors"):
        S.save_state({"w": np.ones(2)}, tmp_path / "w.pt", metadata={"model": "mlp"})


def test_tree_format_key_conflicts(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="both a tensor and a subtree"):
        S.save_state({"a": np.ones(1), "a/b": np.ones(1)}, tmp_path / "w.msgpack")
    with pytest.raises(UsageError, match="empty path segment"):
        S.save_state({"a//b": np.ones(1)}, tmp_path / "w.msgpack")
    with pytest.raises(UsageError, match="same name"):
        S.save_state({"a.b": np.ones(1), "a/b": np.zeros(1)}, tmp_path / "w.orbax")
    with pytest.raises(UsageError, match="zero-size"):
        S.save_state({"a": np.ones((0, 2))}, tmp_path / "w.orbax")
    with pytest.raises(UsageError, match="empty state"):
        S.save_state({}, tmp_path / "w.orbax")
    assert not list(tmp_path.iterdir())


def test_write_format_choice(tmp_path: Path) -> None:
    assert S.sniff(S.save_state({"w": np.ones(1)}, tmp_path / "no_suffix")) == "safetensors"
    assert S.sniff(S.save_state({"w": np.ones(1)}, tmp_path / "w.pth")) == "torch"
    with pytest.raises(UsageError, match="writable formats"):
        S.save_state({"w": np.ones(1)}, tmp_path / "w.x", format="hf-sharded")
    with pytest.raises(UsageError, match="read-only"):
        S.save_state({"w": np.ones(1)}, tmp_path / "model.safetensors.index.json")
    with pytest.raises(UsageError, match="single array"):
        S.save_state({"w": np.ones(1)}, tmp_path / "w.npy")
    with pytest.raises(UsageError, match="mapping of name -> array"):
        S.save_state([np.ones(1)], tmp_path / "w.safetensors")  # type: ignore[arg-type]
    (tmp_path / "adir").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        S.save_state({"w": np.ones(1)}, tmp_path / "adir")
    (tmp_path / "notorbax").mkdir()
    (tmp_path / "notorbax" / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="refusing to replace"):
        S.save_state({"w": np.ones(1)}, tmp_path / "notorbax", format="orbax")
    assert (tmp_path / "notorbax" / "precious.txt").read_text() == "keep me"


def test_orbax_overwrite_replaces_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    S.save_state({"w": np.ones(3)}, path, format="orbax")
    S.save_state({"v": np.zeros(2)}, path, format="orbax")
    assert sorted(S.load_state(path)) == ["v"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ----------------------------------------------------------------------------- sniffing
@pytest.mark.parametrize("fmt", S.WRITE_FORMATS)
def test_sniff_ignores_extension(tmp_path: Path, fmt: str) -> None:
    lie = {"safetensors": "w.pt", "torch": "w.safetensors", "npz": "w.msgpack", "flax-msgpack": "w.npz", "orbax": "w.safetensors"}
    state = {"a.weight": sample("float32"), "b": sample("int64", (4,))}
    path = S.save_state(state, tmp_path / lie[fmt], format=fmt)
    assert S.sniff(path) == fmt
    assert_bit_exact(S.load_state(path), state)


def test_npy_named_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    np.save(path.with_suffix(".npy"), np.arange(3))
    path.with_suffix(".npy").rename(path)
    assert S.sniff(path) == "npy"
    np.testing.assert_array_equal(S.load_state(path)["array"], np.arange(3))


def test_safetensors_header_length_starting_like_a_pickle(tmp_path: Path) -> None:
    # a header of 0x380 bytes starts with 80 03: the pickle protocol-3 marker
    tensor = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    base = len(json.dumps({"__metadata__": {"pad": ""}, "w": tensor}))
    header = json.dumps({"__metadata__": {"pad": "x" * (0x380 - base)}, "w": tensor}).encode()
    assert len(header) == 0x380
    path = st_file(tmp_path / "w.bin", header, b"\0\0\x80\x3f")
    assert path.read_bytes()[:2] == b"\x80\x03"
    assert S.sniff(path) == "safetensors"
    assert S.load_state(path)["w"].tolist() == [1.0]


def test_format_expectation(tmp_path: Path) -> None:
    path = S.save_state({"w": np.ones(1)}, tmp_path / "w.pt", format="safetensors")
    assert S.load_state(path, format="safetensors")["w"].tolist() == [1.0]
    bad(path, "holds safetensors data, not torch", format="torch")
    with pytest.raises(UsageError, match="unknown state format"):
        S.load_state(path, format="pickle")


# ----------------------------------------------------------------------------- files from the frameworks themselves
def test_torch_state_dict_from_torch_save(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    sd = net.state_dict()
    torch.save(sd, tmp_path / "m.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("m.pt", "legacy.pt"):
        loaded = S.load_state(tmp_path / name)
        assert sorted(loaded) == sorted(sd)
        for k, v in sd.items():
            assert loaded[k].tobytes() == v.numpy().tobytes() and loaded[k].dtype == v.numpy().dtype


def test_torch_nested_checkpoint_and_views(tmp_path: Path) -> None:
    import torch

    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"state_dict": {"w": w.T, "h": w.to(torch.bfloat16)}, "epoch": 3, "hist": [w[0], "note"]}, tmp_path / "c.ckpt")
    loaded = S.load_state(tmp_path / "c.ckpt")
    assert sorted(loaded) == ["hist/0", "state_dict/h", "state_dict/w"]  # epoch / strings skipped
    np.testing.assert_array_equal(loaded["state_dict/w"], w.T.numpy())
    assert loaded["state_dict/h"].dtype == ml_dtypes.bfloat16


def test_flax_msgpack_from_flax(tmp_path: Path) -> None:
    from flax import serialization

    variables = {"params": {"Dense_0": {"kernel": sample("float32", (3, 2)), "bias": sample("float32", (2,))}},
                 "batch_stats": {"bn": {"mean": sample("float32", (2,))}}}
    (tmp_path / "v.msgpack").write_bytes(serialization.to_bytes(variables))
    loaded = S.load_state(tmp_path / "v.msgpack")
    assert sorted(loaded) == ["batch_stats/bn/mean", "params/Dense_0/bias", "params/Dense_0/kernel"]
    assert loaded["params/Dense_0/kernel"].tobytes() == variables["params"]["Dense_0"]["kernel"].tobytes()


def test_orbax_from_orbax(tmp_path: Path) -> None:
    import orbax.checkpoint as ocp

    tree = {"params": {"w": sample("bfloat16", (2, 3))}, "step": 7}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((tmp_path / "std").resolve(), tree)
    ckptr.wait_until_finished()
    loaded = S.load_state(tmp_path / "std")
    assert sorted(loaded) == ["params/w"]  # the Python int 'step' is not a tensor
    assert loaded["params/w"].tobytes() == tree["params"]["w"].tobytes()

    with ocp.CheckpointManager((tmp_path / "mgr").resolve()) as mgr:
        for step in (1, 2):
            mgr.save(step, args=ocp.args.StandardSave({"w": np.full(3, step, np.float32)}))
        mgr.wait_until_finished()
    assert S.sniff(tmp_path / "mgr") == "orbax"
    assert S.load_state(tmp_path / "mgr")["w"].tolist() == [2.0] * 3  # newest step
    assert S.load_state(tmp_path / "mgr" / "1")["w"].tolist() == [1.0] * 3


def test_npz_and_safetensors_from_their_libraries(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    state = {"a": sample("float16"), "b": sample("uint8")}
    np.savez(tmp_path / "x.npz", **state)
    np.savez_compressed(tmp_path / "z.npz", **state)
    save_file(state, str(tmp_path / "x.safetensors"))
    for name in ("x.npz", "z.npz", "x.safetensors"):
        assert_bit_exact(S.load_state(tmp_path / name), state)


# ----------------------------------------------------------------------------- HF sharded
def make_hf(root: Path, shards: dict[str, dict[str, np.ndarray]], weight_map: dict[str, str] | None = None) -> Path:
    from safetensors.numpy import save_file

    root.mkdir(exist_ok=True)
    wm: dict[str, str] = {}
    for name, tensors in shards.items():
        save_file(tensors, str(root / name))
        wm.update({k: name for k in tensors})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map if weight_map is not None else wm}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def test_hf_sharded_dir_and_index(tmp_path: Path) -> None:
    s1 = {"embed.weight": sample("float32", (4, 2)), "ln.bias": sample("bfloat16", (2,))}
    s2 = {"head.weight": sample("float16", (2, 2))}
    root = make_hf(tmp_path / "hf", {"model-00001-of-00002.safetensors": s1, "model-00002-of-00002.safetensors": s2})
    (root / "config.json").write_text("{}")
    for p in (root, root / "model.safetensors.index.json"):
        assert S.sniff(p) == "hf-sharded"
        assert_bit_exact(S.load_state(p), {**s1, **s2})
    info = S.inspect_state(root)
    assert info.format == "hf-sharded" and len(info.tensors) == 3
    (root / "config.json").write_text('{"changed": 1}')
    assert S.inspect_state(root).sha256 == info.sha256  # only index + shards count
    S.save_state(s2 | {"head.weight": np.zeros((2, 2), np.float16)}, root / "model-00002-of-00002.safetensors")
    assert S.inspect_state(root).sha256 != info.sha256


def test_hf_missing_shard(tmp_path: Path) -> None:
    root = make_hf(tmp_path / "hf", {"a.safetensors": {"x": np.ones(1)}}, {"x": "a.safetensors", "y": "gone.safetensors"})
    bad(root / "model.safetensors.index.json", r"shard 'gone.safetensors': missing")


def test_hf_duplicated_and_inconsistent(tmp_path: Path) -> None:
    root = make_hf(
        tmp_path / "hf",
        {"a.safetensors": {"x": np.ones(1), "y": np.ones(1)}, "b.safetensors": {"x": np.zeros(1)}},
        {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"},
    )
    err = bad(root / "model.safetensors.index.json", "index and shards disagree")
    assert "tensor 'x': duplicated in shards 'a.safetensors' and 'b.safetensors'" in str(err)
    assert "tensor 'z': the index maps it to 'b.safetensors', which does not contain it" in str(err)
    with pytest.raises(StateFileError, match="duplicated"):
        S.inspect_state(root)


def test_hf_bad_index(tmp_path: Path) -> None:
    root = make_hf(tmp_path / "hf", {"a.safetensors": {"x": np.ones(1)}}, {"x": "../../etc/passwd"})
    bad(root / "model.safetensors.index.json", "no absolute paths")
    (root / "model.safetensors.index.json").write_text('{"weight_map": {"x": ')
    bad(root / "model.safetensors.index.json", "not valid JSON")
    (root / "other.json").write_text('{"hello": 1}')
    bad(root / "other.json", "not a Hugging Face index")
    (root / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    bad(root / "model.safetensors.index.json", "'weight_map' must map")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("fmt", ["safetensors", "torch", "npz", "flax-msgpack"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    path = S.save_state({"w": sample("float32", (64, 64)), "b": sample("int64", (8,))}, tmp_path / f"w{SUFFIX[fmt]}")
    data = path.read_bytes()
    for cut in (len(data) * 6 // 10, len(data) - 1):
        path.write_bytes(data[:cut])
        bad(path, "truncated")


def test_truncated_npy(tmp_path: Path) -> None:
    path = S.save_arrays(sample("float64", (32,)), tmp_path / "a.npy")
    path.write_bytes(path.read_bytes()[:-8])
    bad(path, r"header declares float64 \(32,\) = 256 bytes but 248 bytes follow")
    path.write_bytes(path.read_bytes()[:20])
    bad(path, "invalid .npy header")
    path.write_bytes(path.read_bytes()[:5])
    bad(path, "too short")


def test_truncated_safetensors_inside_header(tmp_path: Path) -> None:
    path = S.save_state({"w": np.ones(4)}, tmp_path / "w.safetensors")
    path.write_bytes(path.read_bytes()[:30])
    bad(path, "runs past the end of the file")


def test_orbax_damaged(tmp_path: Path) -> None:
    path = S.save_state({"w": np.ones(4)}, tmp_path / "ck", format="orbax")
    for f in (path / "d").iterdir():
        f.write_bytes(b"")
    bad(path, "not a readable orbax checkpoint")


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "notes.safetensors").write_text("these are not weights, just some text\n")
    bad(tmp_path / "notes.safetensors", "not a known state format")
    (tmp_path / "short.pt").write_bytes(b"\x01\x02\x03")
    bad(tmp_path / "short.pt", "too short")
    with zipfile.ZipFile(tmp_path / "docs.pt", "w") as zf:
        zf.writestr("readme.txt", "hello")
    bad(tmp_path / "docs.pt", "neither a torch file")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"")
    bad(tmp_path / "w.safetensors", "empty")


def test_missing_path(tmp_path: Path) -> None:
    bad(tmp_path / "nope.safetensors", "no such file or directory")
    with pytest.raises(StateFileError, match="no such file"):
        S.inspect_state(tmp_path / "nope.safetensors")
    with pytest.raises(StateFileError, match="no such file"):
        S.sha256_path(tmp_path / "nope.safetensors")


def test_directory_where_file_expected(tmp_path: Path) -> None:
    d = tmp_path / "weights"
    d.mkdir()
    bad(d, "is a directory, but not a checkpoint directory")
    S.save_state({"w": np.ones(1)}, d / "model.safetensors")
    err = bad(d, "is a directory")
    assert "model.safetensors: pass one of those files instead" in str(err)
    root = make_hf(tmp_path / "hf", {"a.safetensors": {"x": np.ones(1)}})
    (root / "a.safetensors").unlink()
    (root / "a.safetensors").mkdir()
    bad(root, "is a directory, expected a weights file")


def test_safetensors_header_too_large(tmp_path: Path) -> None:
    for n in (S.ST_MAX_HEADER + 1, 2**39):
        path = st_file(tmp_path / "w.safetensors", b"{}", length=n)
        bad(path, "larger than the format's limit of 100,000,000 bytes")


def test_safetensors_header_past_eof(tmp_path: Path) -> None:
    bad(st_file(tmp_path / "w.safetensors", b'{"a": 1}', length=1000), r"header \(1,000 bytes\) runs past the end of the file")


def test_safetensors_overlapping_offsets(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    bad(st_file(tmp_path / "w.safetensors", header, b"\0" * 12), "overlapping or out-of-range data_offsets")


@pytest.mark.parametrize(
    "offsets,data",
    [([[0, 8], [8, 1000]], 16), ([[0, 8], [8, 16]], 8), ([[4, 12], [12, 20]], 20)],
    ids=["end-past-data", "data-too-short", "not-from-zero"],
)
def test_safetensors_out_of_range_offsets(tmp_path: Path, offsets: list[list[int]], data: int) -> None:
    header = {n: {"dtype": "F32", "shape": [(o[1] - o[0]) // 4], "data_offsets": o} for n, o in zip("ab", offsets)}
    bad(st_file(tmp_path / "w.safetensors", header, b"\0" * data), "out-of-range data_offsets")


def test_safetensors_unknown_dtype(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}
    bad(st_file(tmp_path / "w.safetensors", header, b"\0" * 8), "unknown dtype")
    header = {"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}  # known to safetensors, not to us
    path = st_file(tmp_path / "f8.safetensors", header, b"\0" * 2)
    bad(path, "tensor 'a': dtype F8_E4M3")
    with pytest.raises(StateFileError, match="dtypes exporter cannot read"):
        S.inspect_state(path)


def test_safetensors_invalid_header(tmp_path: Path) -> None:
    bad(st_file(tmp_path / "j.safetensors", b"{not json at all}"), "not valid JSON")
    bad(st_file(tmp_path / "u.safetensors", b'{"\xff": 1}'), "not valid UTF-8")
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    bad(st_file(tmp_path / "s.safetensors", header, b"\0" * 8), "shape x dtype size")


# ----------------------------------------------------------------------------- no code execution
class OsSystemCanary:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


class OpenCanary:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def test_canary_is_live(tmp_path: Path) -> None:
    """Control: unpickling the canary really creates the marker, so the tests below can fail."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(OpenCanary(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("canary", [OsSystemCanary, OpenCanary])
def test_malicious_torch_zip_is_not_executed(tmp_path: Path, canary: type) -> None:
    import torch

    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2), "payload": canary(marker)}, path)
    assert S.sniff(path) == "torch"
    err = bad(path, "refused to load")
    assert "can run code" in str(err) and "weights_only=False" not in str(err)
    with pytest.raises(StateFileError):
        S.inspect_state(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_raw_pickle_is_not_executed(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "weights.pth"
    path.write_bytes(pickle.dumps({"w": OsSystemCanary(marker)}, protocol=protocol))
    bad(path, "refused to load: torch's safe loader" if protocol >= 2 else "not a known state format")
    assert not marker.exists()


def test_object_npz_is_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    np.savez(tmp_path / "w.npz", w=np.array([OpenCanary(marker)], dtype=object))
    bad(tmp_path / "w.npz", "Python-object array")
    np.save(tmp_path / "w.npy", np.array([OpenCanary(marker)], dtype=object))
    bad(tmp_path / "w.npy", "never unpickles")
    assert not marker.exists()


def test_full_module_pickle_explains_the_fix(tmp_path: Path) -> None:
    import torch

    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    bad(tmp_path / "model.pt", r"torch.save\(model.state_dict\(\), path\)")


# ----------------------------------------------------------------------------- atomicity
@pytest.mark.parametrize("fmt", ["safetensors", "torch", "npz", "flax-msgpack"])
def test_failed_fsync_leaves_previous_file(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = S.save_state({"w": np.ones(4)}, tmp_path / f"w{SUFFIX[fmt]}")
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StateFileError, match="cannot be written.*No space left"):
        S.save_state({"w": np.zeros(4096)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_exception_mid_torch_save_leaves_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    path = S.save_state({"w": np.ones(4)}, tmp_path / "w.pt")
    before = path.read_bytes()

    def half_save(obj: object, fh: object) -> None:
        fh.write(b"PK\x03\x04 half a zip")  # type: ignore[attr-defined]
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        S.save_state({"w": np.zeros(4)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]


def test_exception_mid_npz_leaves_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from numpy.lib import format as npf

    path = S.save_state({"a": np.ones(4), "b": np.ones(4)}, tmp_path / "w.npz")
    before = path.read_bytes()
    real = npf.write_array
    calls = []

    def second_fails(fp: object, arr: np.ndarray, **kw: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-write")
        real(fp, arr, **kw)

    monkeypatch.setattr(npf, "write_array", second_fails)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        S.save_state({"a": np.zeros(4), "b": np.zeros(4)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_exception_mid_orbax_save_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import orbax.checkpoint as ocp

    path = S.save_state({"w": np.ones(4)}, tmp_path / "ck", format="orbax")
    before = S.sha256_path(path)

    def half_save(self: object, directory: Path, *a: object, **kw: object) -> None:
        Path(directory).mkdir()
        (Path(directory) / "_METADATA").write_text("{half")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", half_save)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        S.save_state({"w": np.zeros(4)}, path, format="orbax")
    assert S.sha256_path(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    monkeypatch.undo()
    assert S.load_state(path)["w"].tolist() == [1.0] * 4


# ----------------------------------------------------------------------------- inspect / hashing
def test_inspect_state_and_sha(tmp_path: Path) -> None:
    state = {"b": sample("int32", (2,)), "a": sample("bfloat16", (3, 4))}
    path = S.save_state(state, tmp_path / "w.safetensors")
    info = S.inspect_state(path)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == S.sha256_path(path)
    assert [t.name for t in info.tensors] == ["a", "b"]
    assert info.tensors[0] == S.TensorInfo("a", "bfloat16", (3, 4), 24)
    assert info.total_bytes == 32
    d = json.loads(json.dumps(info.to_dict()))
    assert d["format"] == "safetensors" and d["tensors"][0]["shape"] == [3, 4]
    assert info.lines()[0].startswith(f"{path}: safetensors, 2 tensors, 32 bytes")


def test_sha256_of_directories(tmp_path: Path) -> None:
    a = S.save_state({"w": np.ones(3)}, tmp_path / "a", format="orbax")
    h = S.sha256_path(a)
    assert S.sha256_path(a) == h
    (a / "extra").write_text("x")
    assert S.sha256_path(a) != h
    manual = tmp_path / "m"
    (manual / "sub").mkdir(parents=True)
    (manual / "x").write_bytes(b"1")
    (manual / "sub" / "y").write_bytes(b"2")
    h1 = S.sha256_path(manual)
    (manual / "sub" / "y").write_bytes(b"3")
    assert S.sha256_path(manual) != h1
    expected = hashlib.sha256()
    for rel, data in (("sub/y", b"3"), ("x", b"1")):
        expected.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    assert S.sha256_path(manual) == expected.hexdigest()


# ----------------------------------------------------------------------------- save_arrays / load_arrays
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".safetensors"])
def test_arrays_raw(tmp_path: Path, suffix: str) -> None:
    arr = sample("float64", (4, 3))
    got = S.load_arrays(S.save_arrays(arr, tmp_path / f"a{suffix}"))
    assert isinstance(got, np.ndarray) and got.tobytes() == arr.tobytes() and got.shape == arr.shape


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_arrays_list_and_dict(tmp_path: Path, suffix: str) -> None:
    items = [sample("float32", (2,)), sample("int64", (3, 1)), sample("bool", ())]
    got = S.load_arrays(S.save_arrays(tuple(items), tmp_path / f"l{suffix}"))
    assert isinstance(got, list) and len(got) == 3
    assert all(g.tobytes() == w.tobytes() and g.dtype == w.dtype and g.shape == w.shape for g, w in zip(got, items))
    d = {"file": items[0], "x": items[1], "allow_pickle": items[2]}  # names np.savez could not take
    got = S.load_arrays(S.save_arrays(d, tmp_path / f"d{suffix}"))
    assert isinstance(got, dict)
    assert_bit_exact(got, d)
    assert S.load_arrays(S.save_arrays([], tmp_path / f"e{suffix}")) == []


def test_arrays_files_need_no_pickle(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    S.save_arrays([np.ones(2)], tmp_path / "l.npz")
    with np.load(tmp_path / "l.npz", allow_pickle=False) as z:
        assert z["0"].tolist() == [1.0, 1.0]
    S.save_arrays(np.ones(2), tmp_path / "a.npy")
    assert np.load(tmp_path / "a.npy", allow_pickle=False).tolist() == [1.0, 1.0]
    S.save_arrays({"k": np.ones(2)}, tmp_path / "d.safetensors")
    assert load_file(str(tmp_path / "d.safetensors"))["k"].tolist() == [1.0, 1.0]


def test_arrays_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="single array"):
        S.save_arrays([np.ones(1)], tmp_path / "l.npy")
    with pytest.raises(UsageError, match="cannot be stored in npy"):
        S.save_arrays(np.ones(1, ml_dtypes.bfloat16), tmp_path / "a.npy")
    with pytest.raises(UsageError, match="not an array"):
        S.save_arrays({"nested": {"a": np.ones(1)}}, tmp_path / "d.npz")
    with pytest.raises(UsageError, match="writable formats"):
        S.save_arrays(np.ones(1), tmp_path / "a.pt", format="torch")
    assert not list(tmp_path.iterdir())
    # any state file loads as a dict
    S.save_state({"w": np.ones(1)}, tmp_path / "w.pt")
    assert list(S.load_arrays(tmp_path / "w.pt")) == ["w"]


# ----------------------------------------------------------------------------- exporter checkpoints, laziness
def test_exporter_checkpoint_is_delegated(tmp_path: Path) -> None:
    from exporter import checkpoint

    model = {"hidden.weight": sample("float32", (2, 2)), "hidden.bias": sample("int64", (2,))}
    checkpoint.save_checkpoint(
        tmp_path / "run", 3, model="mlp", framework="torch", tensors={"model": model, "optimizer": {"m": np.ones(2)}}, state={}
    )
    for path in (tmp_path / "run", tmp_path / "run" / "step-00000003"):
        assert S.sniff(path) == "exporter-checkpoint"
        assert_bit_exact(S.load_state(path), model)  # the model group only
        info = S.inspect_state(path)
        assert info.format == "exporter-checkpoint" and info.path == str(tmp_path / "run" / "step-00000003")
        assert [t.name for t in info.tensors] == ["hidden.bias", "hidden.weight"]
    (tmp_path / "run" / "step-00000003" / "manifest.json").write_text("{}")
    bad(tmp_path / "run" / "step-00000003", "not a checkpoint directory")  # no exporter manifest: not recognised
    (tmp_path / "run" / "step-00000003" / "manifest.json").write_text('{"format": "exporter-checkpoint"}')
    with pytest.raises(StateFileError, match="corrupt or incomplete"):
        S.load_state(tmp_path / "run" / "step-00000003")


@pytest.mark.parametrize(
    "module,fmt,extra",
    [("torch", "torch", "torch"), ("flax.serialization", "flax-msgpack", "jax"), ("orbax.checkpoint", "orbax", "jax")],
)
def test_missing_framework_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, fmt: str, extra: str) -> None:
    path = S.save_state({"w": np.ones(2)}, tmp_path / f"w{SUFFIX[fmt]}")
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(MissingDependencyError, match=rf"pip install 'exporter\[{extra}\]'"):
        S.load_state(path)
    with pytest.raises(MissingDependencyError, match=rf"pip install 'exporter\[{extra}\]'"):
        S.save_state({"w": np.ones(2)}, tmp_path / f"v{SUFFIX[fmt]}")


def test_import_is_lazy() -> None:
    code = (
        "import sys, exporter.state\n"
        "heavy = [m for m in ('torch', 'jax', 'flax', 'orbax', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
