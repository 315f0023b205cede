"""One writer per checkpoint directory: an advisory ``flock`` on ``<dir>/train.lock``.

The kernel drops the lock when the holding process dies (even by SIGKILL), so a crashed
run never leaves a stale lock behind; the file itself stays and is harmless.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from exporter.errors import CheckpointError

__all__ = ["LOCK_FILE", "lock_dir"]

LOCK_FILE = "train.lock"


@contextlib.contextmanager
def lock_dir(ckpt_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock (``train.lock``) on ``ckpt_dir`` (created if missing).

    Released when the block ends or the process dies.  On platforms without ``fcntl``
    no lock is taken.

    Raises:
        CheckpointError: another process holds the lock, or ``ckpt_dir`` is a file or
            cannot be created.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} is a file; pass a directory (it is created if missing)")
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(ckpt_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CheckpointError(f"cannot create the checkpoint directory {ckpt_dir} or its lock: {e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CheckpointError(
                f"another training run is using {ckpt_dir} (it holds {ckpt_dir / LOCK_FILE}); wait for it to "
                "finish or use another --ckpt-dir"
            ) from None
        yield
    finally:
        os.close(fd)
