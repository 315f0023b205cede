"""Write the golden training checkpoint ``tests/data/checkpoint-v3`` (format_version 3: BLAKE3 digests).

The same content as ``checkpoint-v1`` (:mod:`make_checkpoint_v1`), written by the format
that names its hash.  ``tests/test_checkpoint.py`` loads the stored copy and checks that
today's code writes the same bytes from the same content.  Regenerate only when the
on-disk format changes on purpose (and bump ``FORMAT_VERSION`` then)::

    .venv/bin/python tests/data/make_checkpoint_v3.py
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "checkpoint-v3"


def _v1():  # tests/data is not a package
    spec = importlib.util.spec_from_file_location("make_checkpoint_v1", Path(__file__).resolve().parent / "make_checkpoint_v1.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write(root: Path) -> Path:
    """Write the golden step into ``root``; returns the step directory."""
    return _v1().write(root)


if __name__ == "__main__":
    shutil.rmtree(HERE, ignore_errors=True)
    print(write(HERE), file=sys.stderr)
