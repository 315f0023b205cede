"""exporter.lock: one writer per checkpoint directory."""
from __future__ import annotations

from pathlib import Path

import pytest

from exporter.errors import CheckpointError
from exporter.lock import LOCK_FILE, lock_dir


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    d = tmp_path / "new"
    with lock_dir(d):  # created if missing
        assert (d / LOCK_FILE).is_file()
        with pytest.raises(CheckpointError, match=r"another training run is using .*new \(it holds .*train\.lock\)"):
            with lock_dir(d):
                pass
    with lock_dir(d):  # released on exit: it can be taken again
        pass


def test_lock_on_a_file_or_under_one(tmp_path: Path) -> None:
    f = tmp_path / "ck"
    f.write_text("x")
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*ck is a file; pass a directory"):
        with lock_dir(f):
            pass
    with pytest.raises(CheckpointError, match=r"cannot create the checkpoint directory .*ck/sub or its lock"):
        with lock_dir(f / "sub"):
            pass
    assert f.read_text() == "x"
