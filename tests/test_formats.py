"""exporter.formats: the format table, read_state (one pass: format, hash, arrays), duplicate safetensors keys."""
from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from exporter import formats
from exporter import state as S
from exporter.errors import StateFileError, UsageError

from test_state import assert_bit_exact, make_hf, sample, st_file


# ----------------------------------------------------------------------------- the table
def test_every_format_module_has_the_protocol() -> None:
    assert formats.FORMATS == S.FORMATS and formats.WRITE_FORMATS == S.WRITE_FORMATS
    assert set(formats.SNIFF_ORDER) == set(formats.FORMATS)
    for name, mod in formats.MODULES.items():
        assert mod.NAME == name
        assert mod.DTYPES <= formats.ALL_DTYPES and mod.DTYPES == S.FORMAT_DTYPES[name]
        assert isinstance(mod.SUFFIXES, tuple)
        for fn in ("sniff", "read", "load"):
            assert callable(getattr(mod, fn)), (name, fn)
        assert hasattr(mod, "save") == hasattr(mod, "check_save") == (name in formats.WRITE_FORMATS), name
    assert formats.WRITE_FORMATS == ("safetensors", "torch", "npz", "flax-msgpack", "orbax")
    with pytest.raises(UsageError, match="unknown state format 'nope'"):
        formats.module("nope")


def test_module_load_equals_load_state(tmp_path: Path) -> None:
    state = {"a": sample("float32"), "b/c": sample("int16", (4,))}
    for fmt in formats.WRITE_FORMATS:
        path = S.save_state(state, tmp_path / f"w-{fmt}", format=fmt)
        arrays, meta = formats.MODULES[fmt].load(path)
        assert_bit_exact(arrays, state)
        assert meta == {}


# ----------------------------------------------------------------------------- one state per readable format
def _write_checkpoint(root: Path, state: dict[str, np.ndarray]) -> Path:
    from exporter import checkpoint

    for step in (1, 2):
        checkpoint.save_checkpoint(
            root,
            step,
            model="mlp",
            framework="torch",
            tensors={"model": {k: v + step for k, v in state.items()}, "optimizer": {"m": np.zeros(3, np.float32)}},
            state={"step": step},
        )
    return root


def _make(fmt: str, tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A state of format ``fmt`` on disk and the arrays load_state must return for it."""
    state = {"layer.weight": sample("float32", (4, 3)), "layer.bias": sample("float32", (4,), seed=1)}
    if fmt in formats.WRITE_FORMATS:
        path = S.save_state(state, tmp_path / "w", format=fmt)
        return path, state
    if fmt == "npy":
        return S.save_arrays(state["layer.weight"], tmp_path / "w.npy"), {"array": state["layer.weight"]}
    if fmt == "hf-sharded":
        return make_hf(tmp_path / "hf", {"a.safetensors": {"layer.weight": state["layer.weight"]}, "b.safetensors": {"layer.bias": state["layer.bias"]}}), state
    if fmt == "dcp":  # torch.distributed.checkpoint.save in one process, the {"model": ...} layout
        import torch
        import torch.distributed.checkpoint as dcp

        with pytest.warns(UserWarning, match="single process"):
            dcp.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, checkpoint_id=str(tmp_path / "dcp"))
        return tmp_path / "dcp", state
    assert fmt == "exporter-checkpoint"
    root = _write_checkpoint(tmp_path / "ckpt", state)
    return root, {k: v + 2 for k, v in state.items()}  # the newest step


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_read_state_every_format(tmp_path: Path, fmt: str) -> None:
    path, want = _make(fmt, tmp_path)
    got = S.read_state(path)
    assert isinstance(got, S.LoadedState)
    assert got.format == fmt == S.sniff(path)
    assert_bit_exact(got.arrays, want)
    assert_bit_exact(got.arrays, S.load_state(path))
    info = S.inspect_state(path)
    assert got.sha256 == info.sha256 and len(got.sha256) == 64
    assert Path(info.path) == got.path
    assert got.metadata == info.metadata
    if fmt == "exporter-checkpoint":
        step = path / "step-00000002"
        assert got.path == step
        assert got.sha256 == hashlib.sha256((step / "manifest.json").read_bytes()).hexdigest()
        assert got.metadata == {"model": "mlp", "framework": "torch", "step": "2"}
    elif fmt == "hf-sharded":
        assert got.path == path
        entries = sorted((n, S.sha256_path(path / n)) for n in ("a.safetensors", "b.safetensors", "model.safetensors.index.json"))
        h = hashlib.sha256()
        for rel, digest in entries:
            h.update(f"{rel}\0{digest}\n".encode())
        assert got.sha256 == h.hexdigest()
    else:
        assert got.path == path and got.sha256 == S.sha256_path(path)
    with pytest.raises(StateFileError, match="not"):
        S.read_state(path, format="npy" if fmt != "npy" else "npz")


def test_read_state_format_choice_and_errors(tmp_path: Path) -> None:
    path = S.save_state({"w": np.ones(2)}, tmp_path / "w.pt", format="safetensors")
    assert S.read_state(path, format="safetensors").format == "safetensors"
    with pytest.raises(UsageError, match="unknown state format"):
        S.read_state(path, format="pickle")
    with pytest.raises(StateFileError, match="no such file"):
        S.read_state(tmp_path / "missing")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(StateFileError, match="w.pt"):
        S.read_state(path)


def test_read_state_metadata_and_torch_shards(tmp_path: Path) -> None:
    import torch

    path = S.save_state({"w": np.ones(2, np.float32)}, tmp_path / "w.safetensors", metadata={"model": "mlp"})
    assert S.read_state(path).metadata == {"model": "mlp"}
    root = tmp_path / "hf"
    root.mkdir()
    torch.save({"x": torch.ones(2)}, root / "pytorch_model-00001-of-00001.bin")
    (root / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 8}, "weight_map": {"x": "pytorch_model-00001-of-00001.bin"}})
    )
    got = S.read_state(root)
    assert got.format == "hf-sharded" and got.arrays["x"].tolist() == [1.0, 1.0]
    assert got.metadata == {"total_size": "8"} and got.sha256 == S.inspect_state(root).sha256


def test_read_state_damaged_checkpoint_step(tmp_path: Path) -> None:
    from exporter.errors import CheckpointCorruptError

    root = _write_checkpoint(tmp_path / "ckpt", {"w": np.ones(2, np.float32)})
    step = root / "step-00000002"
    data = bytearray((step / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (step / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="blake3 mismatch") as info:
        S.read_state(step)
    assert isinstance(info.value, StateFileError)
    with pytest.warns(UserWarning, match="skipping corrupt"):
        got = S.read_state(root)  # the newest valid step
    assert got.path == root / "step-00000001"


# ----------------------------------------------------------------------------- opens per read
_OPENS: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENS is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _OPENS.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only inside counting_opens()


@contextmanager
def counting_opens() -> Iterator[list[str]]:
    """Every file opened through Python (builtins.open, io.open, os.open) meanwhile."""
    global _OPENS
    _OPENS = []
    try:
        yield _OPENS
    finally:
        _OPENS = None


def _under(opens: list[str], root: Path) -> list[str]:
    return sorted(Path(o).relative_to(root).as_posix() for o in opens if Path(o).is_relative_to(root) and Path(o).is_file())


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "npz", "npy", "flax-msgpack"])
def test_read_state_opens_a_file_once(tmp_path: Path, fmt: str) -> None:
    path, _ = _make(fmt, tmp_path)
    S.read_state(path)  # first use imports the framework (which opens its own files)
    with counting_opens() as opens:
        S.read_state(path)
    assert _under(opens, tmp_path) == [path.name]


def test_read_state_opens_of_directories(tmp_path: Path) -> None:
    root, _ = _make("hf-sharded", tmp_path)
    with counting_opens() as opens:
        S.read_state(root)
    assert _under(opens, root) == ["a.safetensors", "b.safetensors", "model.safetensors.index.json"]

    root, _ = _make("exporter-checkpoint", tmp_path)
    step = root / "step-00000002"
    with counting_opens() as opens:
        S.read_state(step)
    seen = _under(opens, step)
    files = sorted(p.name for p in step.iterdir())
    # exporter.checkpoint reads every file once while verifying it; manifest.json is read
    # by is_checkpoint (sniffing), by the load, and once more here for its hash.
    assert sorted(set(seen)) == files
    assert [f for f in files if seen.count(f) != 1] == ["manifest.json"]
    assert seen.count("manifest.json") == 3


# ----------------------------------------------------------------------------- duplicate keys
DUP_CASES = {
    "tensor": b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    "field": b'{"w": {"dtype": "F32", "dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}',
    "metadata": b'{"__metadata__": {"k": "a", "k": "b"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
}


@pytest.mark.parametrize("case", sorted(DUP_CASES))
@pytest.mark.parametrize("reader", ["load_state", "read_state", "inspect_state"])
def test_safetensors_duplicate_keys_are_refused(tmp_path: Path, case: str, reader: str) -> None:
    key = {"tensor": "w", "field": "dtype", "metadata": "k"}[case]
    path = st_file(tmp_path / "dup.safetensors", DUP_CASES[case], b"\0\0\x80\x3f")
    assert json.loads(DUP_CASES[case])  # Python's json alone accepts it (last wins)
    fn: Callable[..., object] = getattr(S, reader)
    with pytest.raises(StateFileError, match="duplicate JSON keys") as info:
        fn(path)
    msg = str(info.value)
    assert str(path) in msg and f"key {key!r}: appears more than once" in msg
    assert info.value.problems == (f"key {key!r}: appears more than once",)


def test_safetensors_duplicate_keys_in_a_shard(tmp_path: Path) -> None:
    root = make_hf(tmp_path / "hf", {"a.safetensors": {"w": np.ones(1, np.float32)}})
    st_file(root / "a.safetensors", DUP_CASES["tensor"], b"\0\0\x80\x3f")
    for fn in (S.load_state, S.read_state, S.inspect_state):
        with pytest.raises(StateFileError, match=r"a\.safetensors: safetensors header has duplicate JSON keys"):
            fn(root)


def test_safetensors_header_checks_without_the_library(tmp_path: Path) -> None:
    """Header rules the reference implementation has and our own parser must keep."""
    cases = {
        b"[]": "not an object",
        b'{"__metadata__": {"a": 1}}': "'__metadata__' must map strings to strings",
        b'{"w": {"dtype": "F32", "shape": [1]}}': "must be an object with dtype, shape and data_offsets",
        b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}': "not a list of non-negative integers",
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}': "are not \\[begin, end\\]",
        b'{"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}': "shape x dtype size",
    }
    for i, (header, match) in enumerate(cases.items()):
        path = st_file(tmp_path / f"h{i}.safetensors", header, b"\0" * 4 if b'"w"' in header else b"")
        with pytest.raises(StateFileError, match=match):
            formats.safetensors.load(path)  # the module itself: "[]" would not even sniff as safetensors
    # padding after the JSON (as the reference writer emits) and a misaligned tensor are fine
    header = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]}}  '
    path = st_file(tmp_path / "ok.safetensors", header, b"\x07" + struct.pack("<f", 2.5))
    got = S.load_state(path)
    assert got["a"].tolist() == [7] and got["b"].tolist() == [2.5] and got["b"].flags.aligned
