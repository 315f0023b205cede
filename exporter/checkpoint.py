"""Crash-safe full training checkpoints.

A checkpoint directory (``--ckpt-dir``) holds one sub-directory per committed step::

    CKPT_DIR/
      train.lock                   held (flock) by the training run using the directory
      step-00000020/
        model.safetensors          canonical model state (torch-style dotted names, both frameworks)
        model_extra.safetensors    other module buffers (e.g. num_batches_tracked), if any
        optimizer.safetensors      optimizer (+ scheduler) tensors, flattened
        rng.safetensors            RNG tensors (torch CPU/CUDA state, JAX key, data order)
        state.json                 everything else: step, data position, RNG states, the
                                   optimizer/scheduler structure with tensor references
        manifest.json              written last: format, model, framework, step, size and
                                   sha256 of every file, dtype/shape/sha256 of every tensor,
                                   and a sha256 of the manifest itself
      step-00000030/ ...
      .tmp-step-00000040.x1y2/     a write in progress (or a crash's leftover; removed on resume)

Durability: a step directory is built under a ``.tmp-`` name beside its final name, every
file is fsynced, the directory is renamed to ``step-NNNNNNNN`` and the parent fsynced
(:func:`exporter.atomic.atomic_dir`).  So a step directory is either complete or absent;
a crash leaves at most a ``.tmp-`` directory.  Free space is checked before anything is
written (when short, checkpoints that retention would drop after this write anyway are
removed first, never the newest one, and only if the newest one verifies); running out
mid-write (ENOSPC) removes the partial directory.  Either way the previous checkpoint is
untouched.  Retention (keep the last N, and optionally every K-th
step) runs only after the new checkpoint is committed and never removes it.

A checkpoint is *valid* when its manifest parses, its self-hash matches, and every file and
every tensor matches its recorded size/dtype/shape/sha256.  Loading checks every file's
sha256 (which covers every tensor byte) and each tensor's dtype/shape; the per-tensor
hashes are computed when a file's hash fails, to name the damaged tensors, and always by
:func:`verify_checkpoint`.  Loading a checkpoint directory
uses the newest valid step and warns (:class:`CheckpointWarning`) about each newer one that
is corrupt or partial, naming it and why; loading a step directory explicitly raises
:class:`~exporter.errors.CheckpointCorruptError` instead.

No pickle anywhere: tensors go to safetensors and everything else to JSON.  Nested
structures (torch optimizer/scheduler state dicts, RNG states) go through
:func:`encode_tree` / :func:`decode_tree`; JAX pytrees (optax state) through
:func:`flatten_pytree` / :func:`restore_pytree`, which rebuild the structure from a template
(``optimizer.init(params)``) and check count, paths, shapes and dtypes.

Test-only hook: the environment variable ``EXPORTER_TEST_CRASH_AT`` makes the process
SIGKILL itself at a named point, so tests can prove crash safety.  Points are
``write:<step>:<k>`` (after ``k`` files of step ``<step>`` are in the temp directory),
``commit:<step>`` (after the rename, before retention), ``prune:<step>`` (during the first
retention removal: renamed to a ``.tmp-`` name, not yet deleted) and, in :mod:`exporter.training`, ``step:<n>`` (after training step ``n``,
before its checkpoint).  Never set it outside tests.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import uuid
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter import atomic
from exporter.errors import (
    CheckpointCorruptError,
    CheckpointError,
    StateMismatchError,
    format_problems,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "STATE_JSON",
    "CheckpointWarning",
    "CheckpointInfo",
    "Checkpoint",
    "step_dirname",
    "step_dirs",
    "is_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_state",
    "model_checkpoint",
    "prune",
    "clean",
    "state_sha256",
    "encode_tree",
    "decode_tree",
    "flatten_pytree",
    "restore_pytree",
    "capture_rng",
    "restore_rng",
    "lock_dir",
]

CHECKPOINT_FORMAT = "exporter-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_JSON = "state.json"
LOCK_FILE = "train.lock"
CRASH_ENV = "EXPORTER_TEST_CRASH_AT"

_STEP_RE = re.compile(r"^step-(\d{8,})$")
_GROUP_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Slack on top of the exact byte count: a partly filled block per file, directory entries.
_SPACE_SLACK = 64 << 10
_BLOCK = 4096


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt or partial) or a leftover was cleaned up."""


# --------------------------------------------------------------------------------------
# test-only crash hook
# --------------------------------------------------------------------------------------
def _crash_point(point: str) -> None:
    # Test-only (see module docstring): lets tests SIGKILL the process at exact points.
    if os.environ.get(CRASH_ENV) == point:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def step_dirname(step: int) -> str:
    """The directory name of ``step`` (``step-00000042``)."""
    return f"step-{int(step):08d}"


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def step_dirs(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Step directories (committed names only, valid or not) in ``ckpt_dir``, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(s, p) for p in d.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
    return [p for _s, p in sorted(found)]


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_sha256(a: np.ndarray) -> str:
    flat = np.asarray(a, order="C").reshape(-1).view(np.uint8)
    return hashlib.sha256(flat.data).hexdigest()


def state_sha256(state: Mapping[str, np.ndarray]) -> str:
    """One sha256 over a flat state dict: sorted names, each with dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        a = np.asarray(state[name])
        h.update(f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(np.asarray(a, order="C").reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _manifest_self_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _write_file(path: Path, data: bytes) -> None:
    # Plain write: the whole directory is fsynced and renamed by atomic.atomic_dir.
    with open(path, "wb") as fh:
        fh.write(data)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "numpy": np.__version__}
    for dist in ("exporter", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    for mod in ("torch", "jax", "flax", "optax"):
        if mod in sys.modules:
            out[mod] = str(getattr(sys.modules[mod], "__version__", "?"))
    return out


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointInfo:
    """What is known about one step directory without keeping its tensors."""

    path: str
    step: int
    model: str | None
    framework: str | None
    created: str | None
    total_bytes: int
    valid: bool
    problems: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.valid

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "step": self.step,
            "model": self.model,
            "framework": self.framework,
            "created": self.created,
            "total_bytes": self.total_bytes,
            "valid": self.valid,
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, verified checkpoint: tensor groups (``"model"``, ``"optimizer"``, ...) and the JSON state."""

    path: Path
    step: int
    model: str
    framework: str
    tensors: Mapping[str, Mapping[str, np.ndarray]]
    state: Mapping[str, Any]
    manifest: Mapping[str, Any] = field(repr=False)

    def group(self, name: str) -> dict[str, np.ndarray]:
        """The tensors of one group (empty dict when the checkpoint has none)."""
        return dict(self.tensors.get(name, {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "step": self.step,
            "model": self.model,
            "framework": self.framework,
            "groups": {g: sorted(t) for g, t in self.tensors.items()},
            "files": dict(self.manifest.get("files", {})),
        }


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
def save_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    step: int,
    *,
    model: str,
    framework: str,
    tensors: Mapping[str, Mapping[str, np.ndarray]],
    state: Mapping[str, Any],
    keep: int | None = None,
    keep_every: int | None = None,
) -> Path:
    """Durably write checkpoint ``step`` into ``ckpt_dir`` and apply retention.

    Args:
        ckpt_dir: the checkpoint directory (created if missing).
        step: the training step the checkpoint holds (>= 0).
        model: registry name of the model (recorded; checked on resume/export).
        framework: ``"torch"`` or ``"flax"`` (recorded; checked on resume).
        tensors: group name -> {tensor name -> array}; group ``"model"`` must hold the
            canonical model state.  Each group becomes ``<group>.safetensors``.
        state: JSON-serialisable document (use :func:`encode_tree` for nested state).
        keep: after committing, keep only the newest ``keep`` checkpoints (None: keep all).
        keep_every: additionally keep every checkpoint whose step is a multiple of this.

    Returns:
        The committed step directory.

    Raises:
        CheckpointError: not enough free space (checked before writing), the disk filled
            up or another OS error during the write, or the step already exists.  In every
            case nothing under a ``step-*`` name was changed.
    """
    assert isinstance(step, int) and step >= 0, step
    assert "model" in tensors, "the 'model' tensor group is required"
    for g in tensors:
        assert _GROUP_RE.match(g), f"bad group name {g!r}"
    root = Path(ckpt_dir)
    final = root / step_dirname(step)

    files: dict[str, bytes] = {}
    tensor_index: dict[str, dict[str, Any]] = {}
    from safetensors.numpy import save as st_save

    # hashlib releases the GIL on large buffers: hash tensors and files on worker threads
    # while the main thread serialises, instead of one core doing every pass in turn.
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        tensor_hashes: dict[tuple[str, str], Future[str]] = {}
        file_hashes: dict[str, Future[str]] = {}
        for group, arrays in tensors.items():
            clean = {}
            entries = {}
            fname = f"{group}.safetensors"
            for name, arr in arrays.items():
                a = np.asarray(arr, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
                assert a.dtype != object, f"{group}/{name}: object arrays cannot be stored"
                clean[name] = a
                entries[name] = {"dtype": a.dtype.name, "shape": list(a.shape)}
                tensor_hashes[fname, name] = pool.submit(_tensor_sha256, a)
            # One metadata key only: safetensors writes metadata in hash-map order, and a
            # single key keeps the bytes (and so the file hashes) reproducible across runs.
            files[fname] = st_save(clean, metadata={"format": CHECKPOINT_FORMAT})
            file_hashes[fname] = pool.submit(_sha256_hex, files[fname])
            tensor_index[fname] = entries
        try:
            files[STATE_JSON] = json.dumps(state, indent=1, allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise AssertionError(f"checkpoint state is not plain JSON (use encode_tree): {e}") from e
        file_hashes[STATE_JSON] = pool.submit(_sha256_hex, files[STATE_JSON])
        for (fname, name), fut in tensor_hashes.items():
            tensor_index[fname][name]["sha256"] = fut.result()
        file_sha = {n: f.result() for n, f in file_hashes.items()}

    manifest: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model,
        "framework": framework,
        "step": step,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "files": {n: {"bytes": len(b), "sha256": file_sha[n]} for n, b in files.items()},
        "tensors": tensor_index,
    }
    manifest["manifest_sha256"] = _manifest_self_hash(manifest)
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()

    previous = step_dirs(root)
    prev_note = (
        f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    )
    if final.exists():
        raise CheckpointError(
            f"checkpoint {final} already exists; a step is written only once. Remove it (or use an "
            f"empty --ckpt-dir) to write step {step} again"
        )

    root.mkdir(parents=True, exist_ok=True)
    need = sum(len(b) for b in files.values()) + len(manifest_bytes) + _BLOCK * (len(files) + 2) + _SPACE_SLACK
    free = shutil.disk_usage(root).free
    if free < need and keep is not None:
        _make_room(root, step, keep, keep_every, need)
        free = shutil.disk_usage(root).free
    if free < need:
        raise CheckpointError(
            f"not enough free space in {root} for checkpoint step {step}: need about {_fmt_bytes(need)}, "
            f"{_fmt_bytes(free)} free. Nothing was written and {prev_note}. Free up space, keep fewer "
            "checkpoints (--keep), or point --ckpt-dir at a larger disk"
        )

    try:
        with atomic.atomic_dir(final, replace=False) as tmp:
            _crash_point(f"write:{step}:0")
            for k, (name, data) in enumerate(files.items(), start=1):
                _write_file(tmp / name, data)
                _crash_point(f"write:{step}:{k}")
            _write_file(tmp / MANIFEST, manifest_bytes)  # last: its presence marks completeness
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"disk full while writing checkpoint step {step} in {root} ({e.strerror or e}); the partial "
                f"write was removed and {prev_note}. Free up space, keep fewer checkpoints (--keep), or "
                "point --ckpt-dir at a larger disk"
            ) from e
        raise CheckpointError(
            f"cannot write checkpoint step {step} in {root}: {e}; the partial write was removed and {prev_note}"
        ) from e
    _crash_point(f"commit:{step}")

    if keep is not None:
        prune(root, keep=keep, keep_every=keep_every, protect=final, _crash_tag=str(step))
    return final


def _remove_step(root: Path, p: Path, crash: str | None = None) -> None:
    # Rename first: a crash mid-removal leaves a .tmp- name (cleaned later), never a
    # half-deleted step-* directory that would look like a damaged checkpoint.
    doomed = root / f"{atomic.TMP_PREFIX}del-{p.name}.{uuid.uuid4().hex[:8]}"
    os.replace(p, doomed)
    atomic.fsync_dir(root)
    if crash is not None:
        _crash_point(crash)
    shutil.rmtree(doomed, ignore_errors=True)


def _make_room(root: Path, step: int, keep: int, keep_every: int | None, need: int) -> list[Path]:
    """Short of space: remove now, oldest first, what retention would remove once ``step`` is committed.

    The newest committed checkpoint is never touched, and nothing is removed unless it
    verifies (so the last valid checkpoint survives a failed write).
    """
    committed = [p for p in step_dirs(root) if (p / MANIFEST).is_file()]
    if not committed or verify_checkpoint(committed[-1]):
        return []
    steps_after = sorted([_step_of(p) or 0 for p in committed] + [step])
    kept = set(steps_after[-keep:]) | {step}
    if keep_every:
        kept |= {s for s in steps_after if s % keep_every == 0}
    removed = []
    for p in committed[:-1]:
        s = _step_of(p) or 0
        if s in kept or s >= max(kept):
            continue
        _remove_step(root, p)
        removed.append(p)
        if shutil.disk_usage(root).free >= need:
            break
    return removed


def prune(
    ckpt_dir: str | os.PathLike[str],
    *,
    keep: int,
    keep_every: int | None = None,
    protect: str | os.PathLike[str] | None = None,
    _crash_tag: str | None = None,
) -> list[Path]:
    """Retention: keep the newest ``keep`` committed checkpoints and every ``keep_every``-th step.

    Only step directories older than the newest kept one are removed; ``protect`` (the
    checkpoint just committed) is never removed.  Removal renames to a ``.tmp-`` name first,
    so a crash mid-removal never leaves a half-deleted ``step-*`` directory.

    Args:
        ckpt_dir: the checkpoint directory.
        keep: how many of the newest committed checkpoints to keep (>= 1).
        keep_every: also keep steps that are multiples of this (None: no extra ones).
        protect: a step directory that must survive (the one just written).

    Returns:
        The step directories removed.
    """
    assert keep >= 1, keep
    assert keep_every is None or keep_every >= 1, keep_every
    root = Path(ckpt_dir)
    dirs = step_dirs(root)
    committed = [p for p in dirs if (p / MANIFEST).is_file()]
    keep_set = set(committed[-keep:])
    if keep_every:
        keep_set |= {p for p in committed if (_step_of(p) or 0) % keep_every == 0}
    if protect is not None:
        keep_set.add(Path(protect))
    if not keep_set:
        return []
    newest_kept = max(_step_of(p) or 0 for p in keep_set)
    removed: list[Path] = []
    for p in dirs:
        if p in keep_set or (_step_of(p) or 0) >= newest_kept:
            continue
        _remove_step(root, p, f"prune:{_crash_tag}" if _crash_tag is not None and not removed else None)
        removed.append(p)
    return removed


def clean(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove leftover ``.tmp-*`` entries (a crash's partial writes) from ``ckpt_dir``.

    Only call this while no other process writes into ``ckpt_dir`` (training holds
    ``train.lock`` for that).

    Returns:
        The removed paths.
    """
    return atomic.clean_temp(ckpt_dir)


# --------------------------------------------------------------------------------------
# reading and verifying
# --------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        return None, [f"{MANIFEST} is missing (partial or foreign directory)"]
    try:
        manifest = json.loads(mpath.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"{MANIFEST} cannot be parsed ({e})"]
    if not isinstance(manifest, dict):
        return None, [f"{MANIFEST} is not a JSON object"]
    if manifest.get("format") != CHECKPOINT_FORMAT:
        return None, [f"{MANIFEST} has format {manifest.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"]
    if manifest.get("format_version") != FORMAT_VERSION:
        return None, [
            f"{MANIFEST} has format_version {manifest.get('format_version')!r}; this exporter reads "
            f"{FORMAT_VERSION} (upgrade exporter)"
        ]
    if manifest.get("manifest_sha256") != _manifest_self_hash(manifest):
        return None, [f"{MANIFEST} does not match its own sha256 (altered or damaged)"]
    problems = []
    step = _step_of(path)
    if step is not None and manifest.get("step") != step:
        problems.append(f"{MANIFEST} records step {manifest.get('step')!r} but the directory is {path.name}")
    for key in ("model", "framework", "files", "tensors"):
        if key not in manifest:
            problems.append(f"{MANIFEST} lacks {key!r}")
    return manifest, problems


def _load_dir(
    path: Path, *, want: set[str] | None, full: bool = False
) -> tuple[dict[str, Any] | None, dict[str, Any], list[str]]:
    """Read and check one step directory.  Returns (manifest, {file: loaded content}, problems).

    Every file's size and sha256 are always checked; they cover every byte of every tensor.
    The per-tensor sha256s are then checked only where they add something: when a file's
    hash does not match (to name the damaged tensors), or with ``full=True``
    (:func:`verify_checkpoint`).  Hashing each byte once, not twice, halves the load cost.
    """
    from safetensors.numpy import load as st_load

    manifest, problems = _read_manifest(path)
    if manifest is None or problems:
        return manifest, {}, problems
    loaded: dict[str, Any] = {}
    pool = ThreadPoolExecutor(max_workers=1)  # hashes a file while the main thread parses it
    try:
        for fname, meta in sorted(manifest["files"].items()):
            _check_file(path, fname, meta, manifest, want, full, pool, st_load, loaded, problems)
    finally:
        pool.shutdown()
    return manifest, loaded, problems


def _check_file(
    path: Path,
    fname: str,
    meta: Mapping[str, Any],
    manifest: Mapping[str, Any],
    want: set[str] | None,
    full: bool,
    pool: ThreadPoolExecutor,
    st_load: Any,
    loaded: dict[str, Any],
    problems: list[str],
) -> None:
    fpath = path / fname
    if not fpath.is_file():
        problems.append(f"{fname}: missing")
        return
    data = fpath.read_bytes()
    size_bad = len(data) != meta.get("bytes")
    if size_bad:
        problems.append(f"{fname}: {len(data)} bytes, expected {meta.get('bytes')} (truncated or altered)")
        digest = None
    else:
        digest = pool.submit(_sha256_hex, data)
    if fname.endswith(".safetensors"):
        wanted = want is None or fname.removesuffix(".safetensors") in want
        arrays, parse_error = None, None
        if wanted:  # parse while the hash runs (hashlib releases the GIL)
            try:
                arrays = st_load(data)
            except Exception as e:  # safetensors raises its own error types
                parse_error = e
        if digest is not None and digest.result() != meta.get("sha256"):
            problems.append(f"{fname}: sha256 mismatch (content altered or damaged)")
        file_ok = not problems or not problems[-1].startswith(f"{fname}:")
        check_tensors = full or not file_ok
        if not wanted and file_ok:
            return  # hash-checked; parse only groups asked for (or damaged ones, to name tensors)
        if arrays is None and parse_error is None:
            try:
                arrays = st_load(data)
            except Exception as e:  # safetensors raises its own error types
                parse_error = e
        if parse_error is not None:
            problems.append(f"{fname}: cannot be parsed as safetensors ({parse_error})")
            return
        assert arrays is not None
        expected = manifest["tensors"].get(fname, {})
        for name in sorted(set(expected) | set(arrays)):
            if name not in arrays:
                problems.append(f"{fname}: tensor {name!r} missing")
            elif name not in expected:
                problems.append(f"{fname}: tensor {name!r} not in the manifest")
            else:
                a, e = arrays[name], expected[name]
                if a.dtype.name != e["dtype"] or list(a.shape) != e["shape"]:
                    problems.append(
                        f"{fname}: tensor {name!r} is {a.dtype.name}{list(a.shape)}, "
                        f"manifest says {e['dtype']}{e['shape']}"
                    )
                elif check_tensors and _tensor_sha256(a) != e["sha256"]:
                    problems.append(f"{fname}: tensor {name!r} sha256 mismatch (content altered or damaged)")
        loaded[fname] = arrays
        return
    if digest is not None and digest.result() != meta.get("sha256"):
        problems.append(f"{fname}: sha256 mismatch (content altered or damaged)")
    if fname == STATE_JSON and not size_bad:
        try:
            loaded[fname] = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{fname}: cannot be parsed ({e})")


def verify_checkpoint(path: str | os.PathLike[str]) -> list[str]:
    """Check one step directory against its manifest.

    Returns:
        The problems found, one line each (empty list: the checkpoint is valid).
    """
    p = Path(path)
    if not p.is_dir():
        return [f"{p} is not a directory"]
    _m, _l, problems = _load_dir(p, want=None, full=True)
    return sorted(problems)


def _corrupt_error(path: Path, problems: list[str]) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        format_problems(
            f"checkpoint {path} is corrupt or incomplete; load an older step directory, or the checkpoint "
            "directory itself to use its newest valid step:",
            problems,
        )
    )


def _try_load(p: Path, groups: tuple[str, ...] | None) -> tuple[Checkpoint | None, list[str]]:
    manifest, loaded, problems = _load_dir(p, want=set(groups) if groups is not None else None)
    if manifest is None or problems:
        return None, sorted(problems)
    tensors = {
        f.removesuffix(".safetensors"): arrays
        for f, arrays in loaded.items()
        if f.endswith(".safetensors") and (groups is None or f.removesuffix(".safetensors") in groups)
    }
    ckpt = Checkpoint(
        path=p,
        step=int(manifest["step"]),
        model=str(manifest["model"]),
        framework=str(manifest["framework"]),
        tensors=tensors,
        state=loaded.get(STATE_JSON, {}),
        manifest=manifest,
    )
    return ckpt, []


def load_checkpoint(path: str | os.PathLike[str], *, groups: tuple[str, ...] | None = None) -> Checkpoint:
    """Load and verify one step directory.

    Args:
        path: a ``step-NNNNNNNN`` directory (or any directory holding a checkpoint manifest).
        groups: only return these tensor groups (every file is still size- and hash-checked).

    Returns:
        The verified :class:`Checkpoint`.

    Raises:
        CheckpointCorruptError: the manifest is missing/damaged or any file/tensor does not
            match it; every problem is listed.
        CheckpointError: ``path`` is not a directory.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist or is not a directory")
    ckpt, problems = _try_load(p, groups)
    if ckpt is None:
        raise _corrupt_error(p, problems)
    return ckpt


def latest_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    *,
    groups: tuple[str, ...] | None = None,
    skipped: list[tuple[Path, list[str]]] | None = None,
    warn: bool = True,
) -> Checkpoint | None:
    """The newest valid checkpoint in ``ckpt_dir``.

    Each newer step directory that fails verification is reported with a
    :class:`CheckpointWarning` naming it and why (and appended to ``skipped``).

    Args:
        ckpt_dir: the checkpoint directory.
        groups: tensor groups to return (see :func:`load_checkpoint`).
        skipped: if given, receives ``(path, problems)`` for every skipped directory.
        warn: emit the warnings (default True).

    Returns:
        The checkpoint, or None when ``ckpt_dir`` holds no step directories at all.

    Raises:
        CheckpointCorruptError: step directories exist but none of them is valid.
    """
    root = Path(ckpt_dir)
    bad: list[tuple[Path, list[str]]] = []
    result: Checkpoint | None = None
    for p in reversed(step_dirs(root)):
        result, problems = _try_load(p, groups)
        if result is not None:
            break
        bad.append((p, problems))
    if skipped is not None:
        skipped.extend(bad)
    if warn:
        for p, problems in bad:
            instead = f"using {result.path.name} instead" if result is not None else "no valid checkpoint left"
            warnings.warn(
                f"skipping corrupt or partial checkpoint {p}: {'; '.join(problems)} ({instead})",
                CheckpointWarning,
                stacklevel=2,
            )
    if result is None and bad:
        raise CheckpointCorruptError(
            format_problems(
                f"no valid checkpoint in {root}; every step directory failed verification (move them away "
                "to start over):",
                [f"{p.name}: {'; '.join(probs)}" for p, probs in bad],
            )
        )
    return result


def list_checkpoints(ckpt_dir: str | os.PathLike[str], *, verify: bool = True) -> list[CheckpointInfo]:
    """Every step directory in ``ckpt_dir``, oldest first, with its validity.

    ``verify=False`` only reads manifests (no hashing), so ``valid`` then means "manifest ok".
    """
    out = []
    for p in step_dirs(ckpt_dir):
        manifest, problems = _read_manifest(p)
        if verify and manifest is not None and not problems:
            problems = verify_checkpoint(p)
        m = manifest or {}
        out.append(
            CheckpointInfo(
                path=str(p),
                step=_step_of(p) or 0,
                model=m.get("model"),
                framework=m.get("framework"),
                created=m.get("created"),
                total_bytes=sum(f.stat().st_size for f in p.iterdir() if f.is_file()),
                valid=manifest is not None and not problems,
                problems=tuple(sorted(problems)),
            )
        )
    return out


def _looks_like_step(path: Path) -> bool:
    try:
        m = json.loads((path / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == CHECKPOINT_FORMAT


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a training checkpoint directory or one of its step directories.

    Cheap: reads at most one manifest and lists the directory; hashes are checked on load.
    A directory holding ``step-NNNNNNNN`` sub-directories counts even if they are all
    damaged, so that loading it reports the damage instead of "unknown format".
    """
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / MANIFEST).is_file():
        return _looks_like_step(p)
    return bool(step_dirs(p))


def model_checkpoint(path: str | os.PathLike[str], *, model: str | None = None) -> Checkpoint:
    """The checkpoint step whose model part an export of ``path`` uses (model group loaded).

    Args:
        path: a checkpoint directory (its newest valid step is used; newer damaged ones
            are reported with a :class:`CheckpointWarning`) or one step directory (which must
            be valid).
        model: if given, the registry name the checkpoint must have been trained for.

    Returns:
        The :class:`Checkpoint` (``.path`` is the step directory; ``.group("model")`` the
        canonical state, for both torch and flax runs).

    Raises:
        CheckpointCorruptError: the step directory (or every step directory) is damaged.
        CheckpointError: no checkpoint at ``path``.
        StateMismatchError: the checkpoint was trained for a different model than ``model``.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist or is not a directory")
    if (p / MANIFEST).exists() or _step_of(p) is not None:
        ckpt = load_checkpoint(p, groups=("model",))
    else:
        found = latest_checkpoint(p, groups=("model",))
        if found is None:
            raise CheckpointError(
                f"no training checkpoint in {p}: expected step-NNNNNNNN directories written by "
                "`python -m exporter train`"
            )
        ckpt = found
    if model is not None and ckpt.model != model:
        raise StateMismatchError(
            f"checkpoint {ckpt.path} was trained for model {ckpt.model!r}, not {model!r}; "
            f"export it as {ckpt.model!r} or pass a checkpoint of {model!r}"
        )
    return ckpt


def load_model_state(path: str | os.PathLike[str], *, model: str | None = None) -> dict[str, np.ndarray]:
    """The canonical model state (torch-style dotted names) of a training checkpoint.

    Args:
        path: a checkpoint directory (newest valid step) or one step directory.
        model: if given, the registry name the checkpoint must have been trained for.

    Returns:
        name -> array, for both torch and flax runs (flax runs are stored canonically).

    Raises:
        As :func:`model_checkpoint`.
    """
    return dict(model_checkpoint(path, model=model).group("model"))


# --------------------------------------------------------------------------------------
# nested state <-> (JSON document, tensors)
# --------------------------------------------------------------------------------------
_TORCH_WIDEN = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def _is_torch_tensor(obj: Any) -> bool:
    t = sys.modules.get("torch")
    return t is not None and isinstance(obj, t.Tensor)


def _is_jax_array(obj: Any) -> bool:
    j = sys.modules.get("jax")
    return j is not None and isinstance(obj, j.Array)


def encode_tree(obj: Any, tensors: dict[str, np.ndarray], prefix: str = "") -> Any:
    """Encode a nested state (e.g. ``optimizer.state_dict()``) as JSON, moving tensors out.

    Supports dicts (any int/str/float/bool/None keys, order kept), lists, tuples, None,
    bool, int, float (including nan/inf), str, numpy scalars and arrays, torch tensors
    (dtype and device recorded; bfloat16/float8 stored widened to float32, which is exact)
    and jax arrays.  Tensors are added to ``tensors`` under their path and referenced as
    ``{"__tensor__": key}``; :func:`decode_tree` rebuilds the exact structure.

    Raises:
        CheckpointError: a value of an unsupported type (names its path).
    """

    def key_of(path: str) -> str:
        k = path or "value"
        while k in tensors:
            k += "#"
        return k

    def enc(o: Any, path: str) -> Any:
        if o is None or isinstance(o, (bool, str)):
            return o
        if isinstance(o, int) and not isinstance(o, bool):
            return o
        if isinstance(o, float):
            return o if math.isfinite(o) else {"__float__": repr(o)}
        if isinstance(o, np.generic):
            return {"__scalar__": o.dtype.name, "value": enc(o.item(), path)}
        if isinstance(o, np.ndarray):
            k = key_of(path)
            tensors[k] = np.array(o, order="C", copy=True)
            return {"__tensor__": k, "kind": "numpy"}
        if _is_torch_tensor(o):
            t = o.detach()
            ref: dict[str, Any] = {"__tensor__": "", "kind": "torch", "device": str(t.device)}
            dt = str(t.dtype).removeprefix("torch.")
            if dt in _TORCH_WIDEN:
                ref["torch_dtype"] = dt
                t = t.float()
            k = key_of(path)
            ref["__tensor__"] = k
            tensors[k] = np.array(t.cpu().numpy(), order="C", copy=True)
            return ref
        if _is_jax_array(o):
            k = key_of(path)
            tensors[k] = np.array(o, order="C", copy=True)
            return {"__tensor__": k, "kind": "jax"}
        if isinstance(o, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(o)]
        if isinstance(o, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in o):
                return {k: enc(v, f"{path}/{k}" if path else k) for k, v in o.items()}
            items = []
            for k, v in o.items():
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise CheckpointError(
                        f"cannot store state at {path or '<root>'!r}: dict key {k!r} of type {type(k).__name__}"
                    )
                items.append([enc(k, path), enc(v, f"{path}/{k}" if path else str(k))])
            return {"__dict__": items}
        raise CheckpointError(
            f"cannot store state at {path or '<root>'!r}: values of type {type(o).__module__}.{type(o).__name__} "
            "are not supported (use tensors, numbers, strings, lists, tuples and dicts)"
        )

    return enc(obj, prefix)


def decode_tree(doc: Any, tensors: Mapping[str, np.ndarray]) -> Any:
    """Inverse of :func:`encode_tree`.

    Raises:
        CheckpointCorruptError: a referenced tensor is missing.
    """

    def dec(o: Any) -> Any:
        if isinstance(o, list):
            return [dec(v) for v in o]
        if not isinstance(o, dict):
            return o
        if "__float__" in o:
            return float(o["__float__"])
        if "__scalar__" in o:
            return np.dtype(o["__scalar__"]).type(dec(o["value"]))
        if "__tuple__" in o:
            return tuple(dec(v) for v in o["__tuple__"])
        if "__dict__" in o:
            return {dec(k): dec(v) for k, v in o["__dict__"]}
        if "__tensor__" in o:
            key = o["__tensor__"]
            if key not in tensors:
                raise CheckpointCorruptError(f"checkpoint state refers to tensor {key!r}, which is not stored")
            arr = tensors[key]
            kind = o.get("kind", "numpy")
            if kind == "numpy":
                return np.array(arr)
            if kind == "jax":
                import jax.numpy as jnp

                return jnp.asarray(arr)
            assert kind == "torch", kind
            import torch

            t = torch.from_numpy(np.array(arr))
            if "torch_dtype" in o:
                t = t.to(getattr(torch, o["torch_dtype"]))
            device = o.get("device", "cpu")
            if device != "cpu":
                t = t.to(device)
            return t
        return {k: dec(v) for k, v in o.items()}

    return dec(doc)


def flatten_pytree(tree: Any, prefix: str = "") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Flatten a JAX pytree (e.g. an optax state) into (structure document, tensors).

    The document records the treedef (as text, for checking) and every leaf's path, dtype
    and shape; the tensors are keyed ``prefix + keystr(path)``.  Rebuild with
    :func:`restore_pytree` and a template of the same structure.
    """
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    doc_leaves = []
    tensors: dict[str, np.ndarray] = {}
    for path, leaf in leaves:
        key = prefix + jax.tree_util.keystr(path)
        a = np.array(leaf, order="C", copy=True)
        tensors[key] = a
        doc_leaves.append({"key": key, "dtype": a.dtype.name, "shape": list(a.shape)})
    return {"treedef": str(treedef), "leaves": doc_leaves}, tensors


def restore_pytree(template: Any, doc: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *, what: str = "pytree") -> Any:
    """Rebuild a pytree saved by :func:`flatten_pytree` into the structure of ``template``.

    ``template`` is a freshly built tree of the same kind (``optimizer.init(params)``); its
    leaf count, paths, shapes and dtypes must match the saved ones.  Leaves come back as the
    template's leaf types (jax arrays stay jax arrays, numpy stays numpy, Python scalars
    stay Python scalars).

    Raises:
        CheckpointError: the structures differ (every difference listed) — e.g. the
            optimizer configuration changed since the checkpoint was written.
    """
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    saved = list(doc.get("leaves", []))
    problems: list[str] = []
    if str(treedef) != doc.get("treedef"):
        problems.append(f"structure differs: saved {doc.get('treedef')} vs now {treedef}")
    if len(saved) != len(leaves):
        problems.append(f"saved {len(saved)} leaves, the current structure has {len(leaves)}")
    out = []
    for i, ((path, leaf), s) in enumerate(zip(leaves, saved)):
        cur = np.asarray(leaf)
        key = s.get("key")
        if key not in tensors:
            problems.append(f"leaf {i} ({key}): tensor missing")
            continue
        a = tensors[key]
        if list(a.shape) != list(cur.shape) or a.dtype != cur.dtype:
            problems.append(
                f"leaf {i} {jax.tree_util.keystr(path)}: saved {a.dtype.name}{list(a.shape)}, "
                f"expected {cur.dtype.name}{list(cur.shape)}"
            )
            continue
        if isinstance(leaf, jax.Array):
            out.append(jnp.asarray(a))
        elif isinstance(leaf, np.ndarray):
            out.append(np.array(a))
        elif isinstance(leaf, np.generic):
            out.append(a[()])
        else:
            out.append(type(leaf)(a.item()))
    if problems:
        raise CheckpointError(
            format_problems(
                f"the saved {what} does not fit the current one (did the model or optimizer change since the "
                "checkpoint was written? use the same settings or a new --ckpt-dir):",
                problems,
            )
        )
    return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------
def capture_rng(
    generators: Mapping[str, np.random.Generator] | None = None, *, torch: bool | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Capture Python ``random``, NumPy (global + named generators) and torch CPU/CUDA RNG states.

    Args:
        generators: named ``numpy.random.Generator`` objects to capture as well.
        torch: capture torch's states (default: when torch is already imported).

    Returns:
        (JSON document, tensors) to store; restore with :func:`restore_rng`.
    """
    import random

    tensors: dict[str, np.ndarray] = {}
    py = random.getstate()
    doc: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy_global": encode_tree(np.random.get_state(legacy=False), tensors, "numpy_global"),
        "numpy": {n: encode_tree(g.bit_generator.state, tensors, f"numpy/{n}") for n, g in (generators or {}).items()},
    }
    if torch is None:
        torch = "torch" in sys.modules
    if torch:
        import torch as _torch

        tensors["torch/cpu"] = _torch.get_rng_state().numpy().copy()
        doc["torch_cpu"] = "torch/cpu"
        if _torch.cuda.is_available():
            states = _torch.cuda.get_rng_state_all()
            doc["torch_cuda"] = [f"torch/cuda/{i}" for i in range(len(states))]
            for i, s in enumerate(states):
                tensors[f"torch/cuda/{i}"] = s.numpy().copy()
    return doc, tensors


def restore_rng(
    doc: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    generators: Mapping[str, np.random.Generator] | None = None,
) -> None:
    """Restore the RNG states captured by :func:`capture_rng` (named generators in place).

    Raises:
        CheckpointError: a named generator has no saved state, or CUDA states were saved
            but CUDA is not available now (a bit-exact resume is then impossible).
    """
    import random

    v, state, gauss = doc["python"]
    random.setstate((v, tuple(state), gauss))
    np.random.set_state(decode_tree(doc["numpy_global"], tensors))
    for name, g in (generators or {}).items():
        if name not in doc.get("numpy", {}):
            raise CheckpointError(f"checkpoint holds no state for NumPy generator {name!r}")
        g.bit_generator.state = decode_tree(doc["numpy"][name], tensors)
    if "torch_cpu" in doc:
        import torch

        torch.set_rng_state(torch.from_numpy(np.array(tensors[doc["torch_cpu"]])))
        if doc.get("torch_cuda"):
            if not torch.cuda.is_available():
                raise CheckpointError(
                    "the checkpoint was written with CUDA RNG states but CUDA is not available; resume on a "
                    "machine with the same GPUs for a bit-exact run"
                )
            torch.cuda.set_rng_state_all([torch.from_numpy(np.array(tensors[k])) for k in doc["torch_cuda"]])


@contextlib.contextmanager
def lock_dir(ckpt_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock (``train.lock``) on ``ckpt_dir``; released when the process dies.

    Raises:
        CheckpointError: another process holds it.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(ckpt_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
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
