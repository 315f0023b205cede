"""exporter.atomic: a failure at any point leaves the previous file/directory intact."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from exporter import atomic


def test_write_bytes_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    atomic.write_bytes(target, b"old")
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic.write_bytes(target, b"good")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic.write_bytes(target, b"x" * 1000)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_exception_inside_atomic_write_keeps_previous(tmp_path):
    target = tmp_path / "f.txt"
    atomic.write_text(target, "v1")
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(target) as fh:
            fh.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "v1"
    assert not atomic.clean_temp(tmp_path)


def test_atomic_dir_publishes_complete_tree_and_replaces(tmp_path):
    final = tmp_path / "bundle"
    with atomic.atomic_dir(final) as d:
        (d / "a.txt").write_text("1")
        assert not final.exists()  # not visible under the final name until complete
    assert (final / "a.txt").read_text() == "1"
    with atomic.atomic_dir(final) as d:
        (d / "b.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_atomic_dir_failure_keeps_previous_tree(tmp_path):
    final = tmp_path / "bundle"
    with atomic.atomic_dir(final) as d:
        (d / "a.txt").write_text("1")
    with pytest.raises(KeyError):
        with atomic.atomic_dir(final) as d:
            (d / "half.txt").write_text("half")
            raise KeyError("interrupted")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_atomic_dir_replace_false_refuses(tmp_path):
    final = tmp_path / "x"
    final.mkdir()
    with pytest.raises(FileExistsError):
        with atomic.atomic_dir(final, replace=False):
            pass


def test_published_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_bytes(tmp_path / "f", b"1")
        with atomic.atomic_dir(tmp_path / "d") as d:
            (d / "g").write_text("2")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_clean_temp_removes_leftovers_only(tmp_path):
    (tmp_path / ".tmp-ckpt.abc").mkdir()
    (tmp_path / ".tmp-f.bin.xyz").write_bytes(b"")
    (tmp_path / "keep").write_bytes(b"")
    seen = []
    removed = atomic.clean_temp(tmp_path, on_remove=seen.append)
    assert sorted(p.name for p in removed) == [".tmp-ckpt.abc", ".tmp-f.bin.xyz"] == sorted(p.name for p in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_writes_inside_an_atomic_dir_are_plain_and_fsynced_once(tmp_path, monkeypatch):
    """Inside atomic_dir: no per-file temp/rename; on publish one fsync per file and per
    directory, plus the parent once."""
    synced = []
    real = os.fsync

    def counting(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    final = tmp_path / "bundle"
    with atomic.atomic_dir(final) as d:
        atomic.write_bytes(d / "a.bin", b"1")  # a writer built on atomic_write
        assert sorted(p.name for p in d.iterdir()) == ["a.bin"]  # written in place, no temp name
        (d / "sub").mkdir()
        (d / "sub" / "b.txt").write_text("2")
        assert not synced  # nothing fsynced while the directory is filled
    assert (final / "a.bin").read_bytes() == b"1" and (final / "sub" / "b.txt").read_text() == "2"
    names = sorted(os.path.basename(p) for p in synced)
    assert len(synced) == 5 and names.count("a.bin") == 1 and names.count("b.txt") == 1, synced
    assert synced[-1] == str(tmp_path)  # the parent, once, after the rename
    synced.clear()
    atomic.write_bytes(tmp_path / "f.bin", b"x")  # outside: file and directory
    assert len(synced) == 2


def test_scratch_dir_is_plain_and_removed(tmp_path):
    with atomic.scratch_dir(tmp_path) as d:
        atomic.write_bytes(d / "s.bin", b"1")
        assert [p.name for p in d.iterdir()] == ["s.bin"] and d.name.startswith(atomic.TMP_PREFIX)
    assert not d.exists() and not list(tmp_path.iterdir())
