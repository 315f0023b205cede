"""``exporter.modelinfo``: inspect a bundle, a model-zoo directory or an .onnx file; and the terminal progress bar."""

from __future__ import annotations

import io
import os
from pathlib import Path

import onnx
import pytest

from exporter.errors import BundleError, UsageError
from exporter.modelinfo import inspect_model, is_model_path
from exporter.progress import Progress

ZOO = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "simple" / "test_sequence_model1"


def test_a_bundle_shows_provenance_verdict_and_dims(exported) -> None:
    path = exported.out / "minilm" / "torch"
    info = inspect_model(path)
    assert info.kind == "bundle" and info.onnx_file == path / "model.onnx"
    assert info.bytes == (path / "model.onnx").stat().st_size and info.opsets[""] == 20
    assert [(i["name"], i["dtype"], i["dims"]) for i in info.inputs] == [
        ("input_ids", "int64", ["batch", "seq"]),
        ("attention_mask", "int64", ["batch", "seq"]),
    ]
    assert info.outputs[1]["dims"] == ["batch", "seq", 384]
    assert info.verdict["ok"] is True and info.verdict["checks"] == 24 and info.verdict["candidate"] == "onnxruntime"
    assert info.provenance["model"] == "minilm" and info.provenance["exporter"].startswith("torch.onnx")
    assert info.parameters > 22_000_000 and len(info.data_sets) == 12
    text = "\n".join(info.lines())
    assert "verdict: PASS" in text and "input_ids: int64[batch, seq]" in text and "MiB" in text
    assert inspect_model(path / "model.onnx").kind == "onnx"
    assert info.to_dict()["inputs"][0]["dims"] == ["batch", "seq"]


def test_a_zoo_directory() -> None:
    info = inspect_model(ZOO)
    assert info.kind == "zoo" and info.verdict is None and info.data_sets == ("test_data_set_0",)
    assert info.outputs[0]["dims"] == [None, 3, 4] and "out: float32[?, 3, 4]" in "\n".join(info.lines())


def test_what_is_not_a_model(tmp_path: Path) -> None:
    assert not is_model_path(tmp_path) and is_model_path(ZOO)
    with pytest.raises(UsageError, match="not an .onnx file or a directory holding model.onnx"):
        inspect_model(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"junk")
    with pytest.raises(BundleError, match="not a readable ONNX model"):
        inspect_model(tmp_path)


def test_progress_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(out)
    assert not p.tty
    for line in ("[1/2] mlp (torch): exporting ...", "[1/2] mlp (torch): PASS (1.0 s)", "note"):
        p(line)
    p.close()
    assert out.getvalue() == "[1/2] mlp (torch): exporting ...\n[1/2] mlp (torch): PASS (1.0 s)\nnote\n"


def test_progress_bar_on_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(out, tty=True, width=10)
    p("[1/2] mlp (torch): exporting ...")
    assert out.getvalue().startswith("\r[..........] 0/2  mlp (torch): exporting ...")
    p("[1/2] mlp (torch): PASS (1.0 s)")
    p("[2/2] mlp (flax): exporting ...")
    p.close()
    text = out.getvalue()
    assert "[1/2] mlp (torch): PASS (1.0 s)\n" in text  # finished steps stay, as lines
    assert "[#####.....] 1/2  mlp (flax): exporting ..." in text
    assert text.endswith("\r")  # the bar is cleared at the end


def test_verify_runtime_choices_are_the_onnx_runtimes() -> None:
    from exporter.cli import VERIFY_RUNTIMES
    from exporter.runtimes.base import RUNTIMES, runtime_class

    assert list(VERIFY_RUNTIMES) == [name for name in RUNTIMES if runtime_class(name).artifact_kind == "onnx"]
