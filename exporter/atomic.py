"""Durable, atomic writes: temp name in the same directory, fsync, rename, fsync the directory.

A crash or a full disk at any point leaves either the previous file/directory or the new
one under the final name, never a half-written one.  Leftover temp names start with
``.tmp-`` and can be removed by :func:`clean_temp`.

Inside an :func:`atomic_dir` (or a :func:`scratch_dir`) files are written plainly: the
directory is what is published atomically, so :func:`atomic_write` (and every writer built
on it, e.g. ``exporter.state.save_state``) writes straight to the final name there, and
:func:`atomic_dir` fsyncs each file once and each directory once when it publishes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "TMP_PREFIX",
    "atomic_write",
    "write_bytes",
    "write_text",
    "atomic_dir",
    "scratch_dir",
    "fsync_dir",
    "fsync_tree",
    "clean_temp",
]

TMP_PREFIX = ".tmp-"

# Temp directories of the atomic_dir / scratch_dir blocks now running (absolute paths).
_PLAIN: set[str] = set()
_PLAIN_LOCK = threading.Lock()


def _umask() -> int:
    # os.umask can only be read by setting it; restore at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _in_plain_dir(path: Path) -> bool:
    """Whether ``path`` lies inside a directory that an atomic_dir/scratch_dir is filling."""
    with _PLAIN_LOCK:
        if not _PLAIN:
            return False
        roots = tuple(_PLAIN)
    p = os.path.abspath(path)
    return any(p.startswith(root + os.sep) for root in roots)


@contextlib.contextmanager
def _plain(directory: Path) -> Iterator[None]:
    key = os.path.abspath(directory)
    with _PLAIN_LOCK:
        _PLAIN.add(key)
    try:
        yield
    finally:
        with _PLAIN_LOCK:
            _PLAIN.discard(key)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under ``root`` (inclusive), each once."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temp file beside ``path`` for binary writing; on success fsync and rename it.

    On any exception the temp file is removed and ``path`` is untouched.  Inside an
    :func:`atomic_dir` being filled, ``path`` is written directly (the directory is
    published atomically and fsynced as a whole).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if _in_plain_dir(final):
        try:
            with open(final, "wb") as fh:
                yield fh
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(final)
            raise
        return
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent)
    try:
        # mkstemp creates 0600; published files get the usual 0666 & ~umask like open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_write(path) as fh:
        fh.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically replace ``path`` with UTF-8 ``text``."""
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """Build a directory under a temp name beside ``path``; on success publish it as ``path``.

    Yields the temp directory to fill; write into it plainly.  On success every file and
    directory in it is fsynced once, it is renamed to ``path`` and the parent is fsynced
    once.  If ``path`` already exists it is replaced (``replace=True``): the old directory
    is first renamed aside, then the new one renamed in, then the old one deleted, so the
    final name always holds a complete tree.  On any exception the temp directory is
    removed and ``path`` is untouched.  Nested inside another atomic_dir, nothing is
    fsynced here: the outer one does it when it publishes.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    nested = _in_plain_dir(final)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; publish like mkdir would
        with _plain(tmp):
            yield tmp
        if not nested:
            fsync_tree(tmp)
        old = None
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} already exists")
            old = final.parent / f"{TMP_PREFIX}old-{final.name}.{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if not nested:
            fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp directory in ``parent`` for files that are never published; removed at exit.

    Writes into it are plain (nothing there needs to survive a crash; a leftover is a
    ``.tmp-`` name that :func:`clean_temp` removes).
    """
    base = Path(parent)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "scratch.", dir=base))
    try:
        with _plain(tmp):
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_temp(directory: str | os.PathLike[str], *, on_remove: Callable[[Path], None] | None = None) -> list[Path]:
    """Remove leftover ``.tmp-*`` files/directories in ``directory`` (from a crash); return them."""
    removed: list[Path] = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for entry in sorted(d.iterdir()):
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
            if on_remove is not None:
                on_remove(entry)
    return removed
