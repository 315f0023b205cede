"""Crash-safe full training checkpoints: the step-directory format and retention.

A checkpoint directory (``--ckpt-dir``) holds one sub-directory per committed step::

    CKPT_DIR/
      train.lock                   held (flock) by the training run using the directory (exporter.lock)
      step-00000020/
        model.safetensors          canonical model state (torch-style dotted names, both frameworks)
        model_extra.safetensors    other module buffers (e.g. num_batches_tracked), if any
        optimizer.safetensors      optimizer (+ scheduler) tensors, flattened
        rng.safetensors            RNG tensors (torch CPU/CUDA state, JAX key, data order)
        state.json                 everything else: step, data position, RNG states, the
                                   optimizer/scheduler structure with tensor references
        manifest.json              written last: format, the hash algorithm, model, framework,
                                   step, size and digest of every file, dtype/shape/digest of
                                   every tensor, and a digest of the manifest itself
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

Hashes (``format_version`` 3): the manifest names its algorithm, ``"hash": "blake3"``,
and every digest in it is keyed by that name: ``files[name] = {"bytes", "blake3"}``,
``tensors[file][tensor] = {"dtype", "shape", "blake3"}`` and the self-hash
``manifest_blake3`` (BLAKE3 of the compact, key-sorted JSON of every other field); a file's
digest is what ``b3sum`` prints for it.  BLAKE3 is a cryptographic hash that runs several
times faster than sha256, so checking every byte keeps up with the disk.  Digests are
computed while the bytes are written (:mod:`exporter.streamio`: each piece is hashed on its
way from the arrays to the file, the file is never read back), and on load while the bytes
are read (one buffer per file, hashed on a thread as it fills; the tensors are views of
it).  Format versions 1 (single process) and 2 (sharded), written by exporter before it
named its hash, use sha256 under the same keys (``"sha256"``, ``manifest_sha256``) and no
``"hash"`` entry; they still load and verify.  Version 3 covers both kinds of step: its
``layout`` is ``"files"`` for a single-process step, ``"dcp"``/``"orbax"`` for a sharded one.

A checkpoint is *valid* when its manifest parses, its self-hash matches, and every file and
every tensor matches its recorded size/dtype/shape/digest.  Loading checks every file's
digest (which covers every tensor byte) and each tensor's dtype/shape; the per-tensor
digests are computed when a file's digest fails, to name the damaged tensors, and always by
:func:`verify_checkpoint`.  Loading a checkpoint directory
uses the newest valid step and warns (:class:`CheckpointWarning`) about each newer one that
is corrupt or partial, naming it and why; loading a step directory explicitly raises
:class:`~exporter.errors.CheckpointCorruptError` instead.

No pickle anywhere: tensors go to safetensors and everything else to JSON.  Nested state
(optimizer/scheduler state dicts, optax pytrees) is encoded by :mod:`exporter.treecodec`,
RNG states are captured by :mod:`exporter.rng`, and :mod:`exporter.lock` keeps a second
writer out of the directory.

Sharded steps (``layout`` ``"dcp"`` or ``"orbax"``; ``format_version`` 2 before hashes were
named), written by distributed training (:mod:`exporter.distributed` for torch DDP/FSDP
ranks, :mod:`exporter.flax_mesh` for JAX devices), keep the same names and promises; the
engines write the tensors and exporter adds the completion protocol::

    step-00000020/
      dcp/shard-0000K-....safetensors   layout "dcp": model + optimizer tensors, one file per rank
                                        (torch.distributed.checkpoint, HuggingFaceStorageWriter:
                                        safetensors with DCP's sharding info; no pickle)
      model/, optimizer/                layout "orbax": orbax items of sharded jax arrays
      rank-00000.json/.safetensors      per rank: RNG states and data position
      state.json                        step, config, loss, optimizer param groups, scheduler, world size
      manifest.json                     written last, by rank 0: size and digest of every file

Every rank writes into the same temp directory (:func:`sharded_tmp`, a fixed ``.tmp-`` name),
fsyncs and hashes its own files (its JSON and safetensors while writing them; the shards
the engine wrote are read back once, by :func:`hash_files`); the digests are gathered to
rank 0 (that gather is the barrier: it completes only when every rank has finished
writing), which checks that every reported file is there, writes ``manifest.json`` last
and publishes the step with one atomic rename (:func:`commit_sharded`).  A crash before
the rename leaves a ``.tmp-`` directory; after it, a complete step.  Loading checks every
file's size and digest as for single-process steps; the tensors themselves are read by
the engine (``Checkpoint.tensors`` holds the small per-rank files; :func:`model_checkpoint`
consolidates the model group).

Arguments of the wrong form (a negative step, ``keep=0``, a bad group name, a value that is
not an array) raise :class:`~exporter.errors.UsageError`, listing every bad argument; a
path that exists but is not a directory raises :class:`~exporter.errors.CheckpointError`.

Test-only hook: the environment variable ``EXPORTER_TEST_CRASH_AT`` makes the process
SIGKILL itself at a named point, so tests can prove crash safety.  Points are
``write:<step>:<k>`` (after ``k`` files of step ``<step>`` are in the temp directory),
``commit:<step>`` (after the rename, before retention), ``prune:<step>`` (during the first
retention removal: renamed to a ``.tmp-`` name, not yet deleted) and, in
:mod:`exporter.training`, ``step:<n>`` (after training step ``n``, before its checkpoint).
In a distributed run every rank checks the points it passes (``ranks:<step>`` after its
per-rank files, ``engine:<step>`` before the engine writes its shards, ``written:<step>``
after they are written and hashed, before the gather); ``<point>@<rank>`` kills only
that rank.  Never set it outside tests.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import numbers
import os
import re
import shutil
import signal
import sys
import uuid
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter import atomic, streamio
from exporter.errors import CheckpointCorruptError, CheckpointError, ExporterError, StateMismatchError, UsageError
from exporter.hashing import blake3_file, hash_bytes, sha256_bytes, sha256_entries, sha256_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "HASH",
    "LAYOUTS",
    "MANIFEST",
    "STATE_JSON",
    "FRAMEWORKS",
    "CRASH_ENV",
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
    "state_sha256_batches",
    "crash_point",
    "sharded_tmp",
    "rank_file",
    "write_rank_files",
    "hash_files",
    "commit_sharded",
    "load_sharded_state",
]

CHECKPOINT_FORMAT = "exporter-checkpoint"
#: What this exporter writes, for every layout (the manifest names its hash).
FORMAT_VERSION = 3
#: What it reads: 1 (single process, sha256), 2 (sharded, sha256), 3.
READ_VERSIONS = (1, 2, 3)
_LEGACY_SHARDED = 2
#: The hash new checkpoints record (the manifest's ``"hash"``); versions 1 and 2 used sha256.
HASH = "blake3"
_READ_HASHES = ("blake3", "sha256")
#: Sharded step layouts: which engine wrote the tensors.
LAYOUTS = ("dcp", "orbax")
_FILES = "files"  # the layout of a single-process step
MANIFEST = "manifest.json"
STATE_JSON = "state.json"
FRAMEWORKS = ("torch", "flax")
CRASH_ENV = "EXPORTER_TEST_CRASH_AT"

_STEP_RE = re.compile(r"^step-(\d{8,})$")
_RANK_RE = re.compile(r"rank-(\d{5,})\.json")
_GROUP_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# dtypes safetensors writes *and* reads back as numpy (bfloat16/float8 arrays from
# ml_dtypes are written but cannot be loaded again).
_STORABLE = (
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "complex64",
)  # fmt: skip
# Slack on top of the exact byte count: a partly filled block per file, directory entries.
_SPACE_SLACK = 64 << 10
_BLOCK = 4096


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt or partial) or a leftover was cleaned up."""


def crash_point(point: str, rank: int | None = None) -> None:
    """Test-only: SIGKILL this process when ``EXPORTER_TEST_CRASH_AT`` is ``point`` (or ``point@rank``)."""
    want = os.environ.get(CRASH_ENV)
    if want is not None and (want == point or (rank is not None and want == f"{point}@{rank}")):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_path(value: Any) -> bool:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return isinstance(value, str) and value != ""


def _path_problem(name: str, value: Any) -> list[str]:
    if _is_path(value):
        return []
    return [f"{name} must be a directory path (a non-empty str or os.PathLike), got {_show(value)}"]


def _retention_problems(keep: Any, keep_every: Any, *, keep_may_be_none: bool) -> list[str]:
    problems = []
    if not (keep is None and keep_may_be_none) and not (_is_int(keep) and keep >= 1):
        also = "; or None to keep all" if keep_may_be_none else ""
        problems.append(
            f"keep must be an integer >= 1 (how many of the newest checkpoints to keep{also}), got {_show(keep)}"
        )
    if keep_every is not None and not (_is_int(keep_every) and keep_every >= 1):
        problems.append(
            "keep_every must be None or an integer >= 1 (also keep every step that is a multiple of it), "
            f"got {_show(keep_every)}"
        )
    return problems


def _groups_problem(groups: Any) -> list[str]:
    if groups is None:
        return []
    if isinstance(groups, str) or not isinstance(groups, (tuple, list, set, frozenset)):
        return [f"groups must be None or a tuple of group names such as ('model',), got {_show(groups)}"]
    bad = [g for g in groups if not (isinstance(g, str) and _GROUP_RE.fullmatch(g))]
    if bad:
        return [f"groups must name groups matching {_GROUP_RE.pattern} (e.g. 'model', 'optimizer'), got {bad!r}"]
    return []


def _usage(func: str, problems: list[str]) -> None:
    if problems:
        raise UsageError.listing(f"invalid arguments to {func}():", problems)


def _not_a_file(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise CheckpointError(
            f"{what} {path} is a file, not a directory; pass a checkpoint directory (or one of its "
            "step-NNNNNNNN directories)"
        )


def _prepare_tensors(tensors: Any, problems: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Check ``save_checkpoint``'s ``tensors`` and turn them into storable numpy arrays."""
    out: dict[str, dict[str, np.ndarray]] = {}
    if not isinstance(tensors, Mapping):
        problems.append(f"tensors must be a mapping of group name -> {{tensor name: array}}, got {_show(tensors)}")
        return out
    if "model" not in tensors:
        problems.append("tensors must hold the 'model' group (the canonical model state); add tensors['model']")
    for group, arrays in tensors.items():
        if not (isinstance(group, str) and _GROUP_RE.fullmatch(group)):
            problems.append(
                f"group name {group!r} must match {_GROUP_RE.pattern} (it names <group>.safetensors); rename the group"
            )
            continue
        if not isinstance(arrays, Mapping):
            problems.append(f"group {group!r} must be a mapping of tensor name -> array, got {_show(arrays)}")
            continue
        clean: dict[str, np.ndarray] = {}
        for name, arr in arrays.items():
            where = f"tensor {group}/{name}"
            if not isinstance(name, str) or not name or name == "__metadata__":
                problems.append(f"tensor {group}/{name!r}: names must be non-empty str (not '__metadata__'); rename the tensor")
                continue
            if not (isinstance(arr, (np.ndarray, np.generic)) or hasattr(arr, "__array__")):
                problems.append(f"{where} must be an array (numpy, or a CPU torch/jax array), got {_show(arr)}")
                continue
            try:
                a = np.asarray(arr, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
            except (TypeError, ValueError, RuntimeError) as e:  # torch: requires grad / not on the CPU
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                problems.append(f"{where}: cannot be read as a numpy array ({reason}); pass .detach().cpu().numpy()")
                continue
            if a.dtype.name not in _STORABLE:
                problems.append(
                    f"{where}: dtype {a.dtype} cannot be stored (supported: {', '.join(_STORABLE)}); convert it, "
                    "e.g. bfloat16 -> float32 (exact)"
                )
                continue
            if not a.dtype.isnative:  # safetensors stores little-endian; hash what it stores
                a = a.astype(a.dtype.newbyteorder("="))
            clean[name] = a
        out[group] = clean
    return out


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
    """Step directories (committed names only, valid or not) in ``ckpt_dir``, oldest first.

    Raises:
        UsageError: ``ckpt_dir`` is not a path.
    """
    _usage("step_dirs", _path_problem("ckpt_dir", ckpt_dir))
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(s, p) for p in d.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
    return [p for _s, p in sorted(found)]


def _tensor_bytes(a: np.ndarray) -> memoryview:
    """The bytes a tensor's manifest digest covers: C order, native byte order."""
    return np.asarray(a, order="C").reshape(-1).view(np.uint8).data


def state_sha256(state: Mapping[str, np.ndarray]) -> str:
    """One sha256 over a flat state dict: sorted names, each with dtype, shape and bytes."""
    return state_sha256_batches([state])


def state_sha256_batches(batches: Iterable[Mapping[str, np.ndarray]]) -> str:
    """:func:`state_sha256` of the union of ``batches`` (disjoint names), holding one batch at a time."""
    entries: dict[str, tuple[str, str]] = {}
    for batch in batches:
        for name, value in batch.items():
            assert name not in entries, name
            a = np.asarray(value)
            entries[name] = (f"{name}\0{a.dtype.str}\0{list(a.shape)}", sha256_bytes(_tensor_bytes(a)))
    return sha256_entries(entries[n] for n in sorted(entries))


def _self_key(algorithm: str) -> str:
    return f"manifest_{algorithm}"


def _manifest_self_hash(manifest: Mapping[str, Any], algorithm: str) -> str:
    # Part of the on-disk format: the digest of the compact, key-sorted JSON of every other field.
    body = {k: v for k, v in manifest.items() if k != _self_key(algorithm)}
    return hash_bytes(algorithm, json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _seal(manifest: dict[str, Any]) -> bytes:
    """Add the self-hash to a new manifest; its bytes as written."""
    manifest[_self_key(HASH)] = _manifest_self_hash(manifest, HASH)
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def _is_sharded(manifest: Mapping[str, Any]) -> bool:
    return manifest.get("format_version") == _LEGACY_SHARDED or manifest.get("layout", _FILES) != _FILES


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "numpy": np.__version__}
    for dist in ("exporter", "safetensors", "blake3"):
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
    #: sharded steps: rank -> (its JSON document, its tensors) from ``rank-NNNNN.*``
    ranks: Mapping[int, tuple[Mapping[str, Any], Mapping[str, np.ndarray]]] = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> str:
        """``"files"`` (format 1: every tensor in this directory's safetensors) or a sharded layout (:data:`LAYOUTS`)."""
        return str(self.manifest.get("layout", "files"))

    def group(self, name: str) -> dict[str, np.ndarray]:
        """The tensors of one group (empty dict when the checkpoint has none)."""
        return dict(self.tensors.get(name, {}))

    def model_info(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of the model group, from the manifest (no tensor is read)."""
        entries = self.manifest["tensors"].get("model" if self.layout != "files" else "model.safetensors", {})
        return {n: (tuple(e["shape"]), str(e["dtype"])) for n, e in entries.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "step": self.step,
            "model": self.model,
            "framework": self.framework,
            "layout": self.layout,
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
        step: the training step the checkpoint holds (an integer >= 0).
        model: registry name of the model (recorded; checked on resume/export).
        framework: ``"torch"`` or ``"flax"`` (recorded; checked on resume).
        tensors: group name -> {tensor name -> array}; group ``"model"`` must hold the
            canonical model state.  Each group becomes ``<group>.safetensors``; group names
            match ``[a-z][a-z0-9_]*``.
        state: JSON-serialisable mapping (encode nested state with
            :func:`exporter.treecodec.encode_tree`).
        keep: after committing, keep only the newest ``keep`` checkpoints (None: keep all).
        keep_every: additionally keep every checkpoint whose step is a multiple of this.

    Returns:
        The committed step directory.

    Raises:
        UsageError: an argument of the wrong form (every one listed): a negative or
            non-integer step, ``keep`` < 1, a bad group name, a group that is not a
            mapping, a value that is not an array or has a dtype safetensors cannot hold,
            a state that is not plain JSON.
        CheckpointError: ``ckpt_dir`` is a file, not enough free space (checked before
            writing), the disk filled up or another OS error during the write, or the step
            already exists.  In every case nothing under a ``step-*`` name was changed.
    """
    problems = _path_problem("ckpt_dir", ckpt_dir)
    if not (_is_int(step) and step >= 0):
        problems.append(f"step must be an integer >= 0 (the training step the checkpoint holds), got {_show(step)}")
    if not (isinstance(model, str) and model):
        problems.append(f"model must be the model's registry name (a non-empty str), got {_show(model)}")
    if not (isinstance(framework, str) and framework in FRAMEWORKS):
        problems.append(f"framework must be one of {', '.join(map(repr, FRAMEWORKS))}, got {_show(framework)}")
    problems += _retention_problems(keep, keep_every, keep_may_be_none=True)
    groups = _prepare_tensors(tensors, problems)
    state_bytes = b""
    if not isinstance(state, Mapping):
        problems.append(f"state must be a JSON-serialisable mapping, got {_show(state)}")
    else:
        try:
            state_bytes = json.dumps(dict(state), indent=1, allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            problems.append(f"state must be plain JSON ({e}); encode nested state with exporter.treecodec.encode_tree")
    _usage("save_checkpoint", problems)
    step = int(step)
    root = Path(ckpt_dir)
    final = root / step_dirname(step)
    _not_a_file(root, "checkpoint directory")
    if final.exists():
        raise CheckpointError(
            f"checkpoint {final} already exists; a step is written only once. Remove it (or use an "
            f"empty --ckpt-dir) to write step {step} again"
        )

    # Sizes are known before a byte is written (the safetensors header follows from the
    # dtypes and shapes), so free space is checked first; the digests are computed while
    # the files are written (exporter.streamio), the manifest last.
    meta = {"format": CHECKPOINT_FORMAT}  # one key: safetensors then writes reproducible bytes
    sizes: dict[str, int] = {}
    tensor_index: dict[str, dict[str, Any]] = {}
    for group, arrays in groups.items():
        fname = f"{group}.safetensors"
        prefix, layout = streamio.safetensors_prefix({n: (a.dtype.name, a.shape) for n, a in arrays.items()}, meta)
        sizes[fname] = len(prefix) + (layout[-1][2] if layout else 0)
        tensor_index[fname] = {n: {"dtype": a.dtype.name, "shape": list(a.shape)} for n, a in arrays.items()}
    sizes[STATE_JSON] = len(state_bytes)
    manifest: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "hash": HASH,
        "layout": _FILES,
        "model": model,
        "framework": framework,
        "step": step,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    digest_len = len(hash_bytes(HASH, b""))
    skeleton = {  # the manifest's size: every digest has a fixed length
        **manifest,
        "files": {n: {"bytes": b, HASH: "0" * digest_len} for n, b in sizes.items()},
        "tensors": {f: {n: {**e, HASH: "0" * digest_len} for n, e in t.items()} for f, t in tensor_index.items()},
    }
    manifest_size = len(_seal(skeleton))

    previous = step_dirs(root)
    prev_note = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the checkpoint directory {root}: {e}") from e
    need = sum(sizes.values()) + manifest_size + _BLOCK * (len(sizes) + 2) + _SPACE_SLACK
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

    files: dict[str, dict[str, Any]] = {}
    try:
        # Plain writes: atomic_dir fsyncs every file and the directory, then renames it.
        with atomic.atomic_dir(final, replace=False) as tmp:
            crash_point(f"write:{step}:0")
            k = 0
            for group, arrays in groups.items():
                fname = f"{group}.safetensors"
                files[fname], digests = streamio.write_safetensors(tmp / fname, arrays, meta, HASH)
                for name, digest in digests.items():
                    tensor_index[fname][name][HASH] = digest
                k += 1
                crash_point(f"write:{step}:{k}")
            files[STATE_JSON] = streamio.write_blob(tmp / STATE_JSON, state_bytes, HASH)
            crash_point(f"write:{step}:{k + 1}")
            manifest["files"] = files
            manifest["tensors"] = tensor_index
            streamio.write_blob(tmp / MANIFEST, _seal(manifest), HASH)  # last: its presence marks completeness
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
    crash_point(f"commit:{step}")

    if keep is not None:
        _prune(root, keep, keep_every, protect=final, crash_tag=str(step))
    return final


# --------------------------------------------------------------------------------------
# writing sharded steps (every rank writes; rank 0 commits)
# --------------------------------------------------------------------------------------
def sharded_tmp(ckpt_dir: str | os.PathLike[str], step: int) -> Path:
    """The temp directory every rank writes step ``step`` into (a fixed name all ranks agree on).

    A leftover of a crashed attempt has the same name: training removes every ``.tmp-``
    entry (:func:`clean`) before it starts, while it holds the directory's lock.
    """
    return Path(ckpt_dir) / f"{atomic.TMP_PREFIX}{step_dirname(step)}.shards"


def rank_file(rank: int, suffix: str) -> str:
    """``rank-00003.json`` / ``rank-00003.safetensors``: one rank's own state in a sharded step."""
    return f"rank-{int(rank):05d}{suffix}"


def write_rank_files(
    tmp: Path, rank: int, doc: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """Write one rank's JSON document and tensors into a sharded step's temp directory (fsynced).

    Both are hashed while they are written (:mod:`exporter.streamio`).

    Returns:
        ``{file name: {"bytes", HASH}}`` for the manifest.
    """
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    assert all(a.dtype.name in _STORABLE and a.dtype.isnative for a in arrays.values()), {k: a.dtype for k, a in arrays.items()}
    doc_bytes = json.dumps(dict(doc), indent=1, allow_nan=False).encode()
    jname, sname = rank_file(rank, ".json"), rank_file(rank, ".safetensors")
    out = {jname: streamio.write_blob(tmp / jname, doc_bytes, HASH, fsync=True)}
    out[sname], _digests = streamio.write_safetensors(tmp / sname, arrays, {"format": CHECKPOINT_FORMAT}, HASH, fsync=True)
    return out


def hash_files(tmp: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", HASH}}`` of files (relative POSIX paths) under ``tmp``, hashed on threads.

    For files another writer (the DCP/orbax engine) has just written: one read each, from
    the page cache while the write is recent.
    """

    def one(name: str) -> tuple[str, dict[str, Any]]:
        f = tmp / name
        return name, {"bytes": f.stat().st_size, HASH: blake3_file(f)}

    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        return dict(pool.map(one, sorted(names)))


def commit_sharded(
    ckpt_dir: str | os.PathLike[str],
    step: int,
    *,
    layout: str,
    model: str,
    framework: str,
    files: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, Mapping[str, Mapping[str, Any]]],
    state: Mapping[str, Any],
    info: Mapping[str, Any],
    keep: int | None = None,
    keep_every: int | None = None,
) -> Path:
    """Rank 0's half of the completion protocol: publish step ``step`` once every rank has written.

    Call it only after every rank's files are written, fsynced and reported (``files``, as
    gathered from the ranks).  It checks that exactly the reported files are in
    :func:`sharded_tmp` with the reported sizes, writes ``state.json``, then
    ``manifest.json`` last, fsyncs the tree, renames it to ``step-NNNNNNNN`` (one atomic
    rename), fsyncs the parent and applies retention.

    Args:
        ckpt_dir: the checkpoint directory.
        step: the step the checkpoint holds.
        layout: one of :data:`LAYOUTS`.
        model, framework: as for :func:`save_checkpoint`.
        files: every file the ranks wrote, relative path -> ``{"bytes", HASH}`` (from
            :func:`write_rank_files` and :func:`hash_files`).
        tensors: group -> name -> ``{"dtype", "shape", "key"}`` (``key``: the name the
            engine stores it under); group ``"model"`` is what an export reads.
        state: plain JSON (``state.json``).
        info: more manifest fields (``world_size``, ``strategy``, ``devices``).
        keep, keep_every: retention, as for :func:`save_checkpoint`.

    Returns:
        The committed step directory.

    Raises:
        CheckpointError: a reported file is missing or has another size, a file nobody
            reported is in the temp directory, the step already exists, or an OS error;
            nothing under a ``step-*`` name was changed.
    """
    assert layout in LAYOUTS and framework in FRAMEWORKS, (layout, framework)
    root = Path(ckpt_dir)
    tmp = sharded_tmp(root, step)
    final = root / step_dirname(step)
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists; a step is written only once")
    problems = []
    present = {f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file()}
    for name in sorted(set(files) - present):
        problems.append(f"{name}: reported by a rank but not in {tmp.name}")
    for name in sorted(present - set(files)):
        problems.append(f"{name}: in {tmp.name} but no rank reported writing it")
    for name in sorted(set(files) & present):
        if (tmp / name).stat().st_size != files[name]["bytes"]:
            problems.append(f"{name}: {(tmp / name).stat().st_size} bytes on disk, the rank reported {files[name]['bytes']}")
    if problems:
        raise CheckpointError.listing(f"checkpoint step {step} in {root} is not complete; it was not committed:", problems)
    state_bytes = json.dumps(dict(state), indent=1, allow_nan=False).encode()
    manifest: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "hash": HASH,
        "layout": layout,
        "model": model,
        "framework": framework,
        "step": int(step),
        **dict(info),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "tensors": {g: {n: dict(e) for n, e in t.items()} for g, t in tensors.items()},
    }
    try:
        state_entry = streamio.write_blob(tmp / STATE_JSON, state_bytes, HASH, fsync=True)
        manifest["files"] = {**{n: dict(files[n]) for n in sorted(files)}, STATE_JSON: state_entry}
        streamio.write_blob(tmp / MANIFEST, _seal(manifest), HASH, fsync=True)  # last
        atomic.fsync_tree(tmp)
        os.replace(tmp, final)
        atomic.fsync_dir(root)
    except OSError as e:
        raise CheckpointError(f"cannot commit checkpoint step {step} in {root}: {e}; the previous checkpoints are intact") from e
    crash_point(f"commit:{step}", 0)
    if keep is not None:
        _prune(root, keep, keep_every, protect=final, crash_tag=str(step))
    return final


def _remove_step(root: Path, p: Path, crash: str | None = None) -> None:
    # Rename first: a crash mid-removal leaves a .tmp- name (cleaned later), never a
    # half-deleted step-* directory that would look like a damaged checkpoint.
    doomed = root / f"{atomic.TMP_PREFIX}del-{p.name}.{uuid.uuid4().hex[:8]}"
    os.replace(p, doomed)
    atomic.fsync_dir(root)
    if crash is not None:
        crash_point(crash)
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
) -> list[Path]:
    """Retention: keep the newest ``keep`` committed checkpoints and every ``keep_every``-th step.

    Only step directories older than the newest kept one are removed; ``protect`` (the
    checkpoint just committed) is never removed.  Removal renames to a ``.tmp-`` name first,
    so a crash mid-removal never leaves a half-deleted ``step-*`` directory.

    Args:
        ckpt_dir: the checkpoint directory (a missing one holds nothing to remove).
        keep: how many of the newest committed checkpoints to keep (an integer >= 1).
        keep_every: also keep steps that are multiples of this (None: no extra ones).
        protect: a step directory that must survive (the one just written).

    Returns:
        The step directories removed.

    Raises:
        UsageError: ``keep``/``keep_every`` not integers >= 1, or a path argument that is
            not a path.
        CheckpointError: ``ckpt_dir`` is a file.
    """
    problems = _path_problem("ckpt_dir", ckpt_dir) + _retention_problems(keep, keep_every, keep_may_be_none=False)
    if protect is not None and not _is_path(protect):
        problems.append(f"protect must be None or the path of a step directory, got {_show(protect)}")
    _usage("prune", problems)
    root = Path(ckpt_dir)
    _not_a_file(root, "checkpoint directory")
    return _prune(root, keep, keep_every, protect=Path(protect) if protect is not None else None)


def _prune(
    root: Path, keep: int, keep_every: int | None, *, protect: Path | None, crash_tag: str | None = None
) -> list[Path]:
    dirs = step_dirs(root)
    committed = [p for p in dirs if (p / MANIFEST).is_file()]
    keep_set = set(committed[-keep:])
    if keep_every:
        keep_set |= {p for p in committed if (_step_of(p) or 0) % keep_every == 0}
    if protect is not None:
        keep_set.add(protect)
    if not keep_set:
        return []
    newest_kept = max(_step_of(p) or 0 for p in keep_set)
    removed: list[Path] = []
    for p in dirs:
        if p in keep_set or (_step_of(p) or 0) >= newest_kept:
            continue
        _remove_step(root, p, f"prune:{crash_tag}" if crash_tag is not None and not removed else None)
        removed.append(p)
    return removed


def clean(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove leftover ``.tmp-*`` entries (a crash's partial writes) from ``ckpt_dir``.

    Only call this while no other process writes into ``ckpt_dir`` (training holds
    ``train.lock`` for that, :func:`exporter.lock.lock_dir`).

    Returns:
        The removed paths (none when ``ckpt_dir`` does not exist).

    Raises:
        UsageError: ``ckpt_dir`` is not a path.
        CheckpointError: ``ckpt_dir`` is a file.
    """
    _usage("clean", _path_problem("ckpt_dir", ckpt_dir))
    _not_a_file(Path(ckpt_dir), "checkpoint directory")
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
    version = manifest.get("format_version")
    if version not in READ_VERSIONS or isinstance(version, bool):
        return None, [
            f"{MANIFEST} has format_version {version!r}; this exporter reads "
            f"{', '.join(map(str, READ_VERSIONS))} (upgrade exporter)"
        ]
    alg = _algorithm(manifest)
    if alg is None:
        return None, [
            f"{MANIFEST} names hash {manifest.get('hash')!r}; this exporter knows "
            f"{', '.join(_READ_HASHES)} for format_version {version} (damaged, or upgrade exporter)"
        ]
    if manifest.get(_self_key(alg)) != _manifest_self_hash(manifest, alg):
        return None, [f"{MANIFEST} does not match its own {alg} (altered or damaged)"]
    problems = []
    layouts = LAYOUTS if version == _LEGACY_SHARDED else (None,) if version == 1 else (_FILES, *LAYOUTS)
    if manifest.get("layout") not in layouts:
        want = ", ".join(str(x) for x in layouts if x is not None) or "none"
        problems.append(f"{MANIFEST} has layout {manifest.get('layout')!r}, expected {want} for format_version {version}")
    step = _step_of(path)
    if step is not None and manifest.get("step") != step:
        problems.append(f"{MANIFEST} records step {manifest.get('step')!r} but the directory is {path.name}")
    for key in ("model", "framework", "files", "tensors"):
        if key not in manifest:
            problems.append(f"{MANIFEST} lacks {key!r}")
    return manifest, problems


def _algorithm(manifest: Mapping[str, Any]) -> str | None:
    """The hash every digest of ``manifest`` was made with (None: one this exporter does not know)."""
    if manifest.get("format_version") in (1, _LEGACY_SHARDED):
        return "sha256" if manifest.get("hash", "sha256") == "sha256" else None
    alg = manifest.get("hash")
    return alg if isinstance(alg, str) and alg in _READ_HASHES else None


def _load_dir(
    path: Path, *, want: set[str] | None, full: bool = False
) -> tuple[dict[str, Any] | None, dict[str, Any], list[str]]:
    """Read and check one step directory.  Returns (manifest, {file: loaded content}, problems).

    Every file's size and digest are always checked; they cover every byte of every tensor.
    The per-tensor digests are then checked only where they add something: when a file's
    hash does not match (to name the damaged tensors), or with ``full=True``
    (:func:`verify_checkpoint`).  Hashing each byte once, not twice, halves the load cost.
    """
    from safetensors.numpy import load as st_load

    manifest, problems = _read_manifest(path)
    if manifest is None or problems:
        return manifest, {}, problems
    if _is_sharded(manifest):
        return manifest, *_load_sharded(path, manifest, st_load)
    loaded: dict[str, Any] = {}
    for fname, meta in sorted(manifest["files"].items()):
        _check_file(path, fname, meta, manifest, want, full, st_load, loaded, problems)
    return manifest, loaded, problems


def _check_file(
    path: Path,
    fname: str,
    meta: Mapping[str, Any],
    manifest: Mapping[str, Any],
    want: set[str] | None,
    full: bool,
    st_load: Any,
    loaded: dict[str, Any],
    problems: list[str],
) -> None:
    """Read one file of a single-process step once (hashed while it is read) and check it."""
    alg = _algorithm(manifest)
    assert alg is not None  # _read_manifest checked it
    fpath = path / fname
    if not fpath.is_file():
        problems.append(f"{fname}: missing")
        return
    try:
        buf, digest = streamio.read_hashed(fpath, alg)
    except OSError as e:
        problems.append(f"{fname}: cannot be read ({e})")
        return
    size_bad = len(buf) != meta.get("bytes")
    if size_bad:
        problems.append(f"{fname}: {len(buf)} bytes, expected {meta.get('bytes')} (truncated or altered)")
    elif digest != meta.get(alg):
        problems.append(f"{fname}: {alg} mismatch (content altered or damaged)")
    file_ok = not problems or not problems[-1].startswith(f"{fname}:")
    if fname.endswith(".safetensors"):
        if file_ok and not (want is None or fname.removesuffix(".safetensors") in want):
            return  # hash-checked; parse only groups asked for (or damaged ones, to name tensors)
        expected = manifest["tensors"].get(fname, {})
        # The file as exporter writes it for the manifest's tensors: each tensor a view of buf.
        arrays = streamio.views(buf, spec, {"format": CHECKPOINT_FORMAT}) if (spec := _tensor_spec(expected)) else None
        if arrays is None:  # another header (a damaged file, another writer): parse it to say what differs
            try:
                arrays = st_load(buf.tobytes())
            except Exception as e:  # safetensors raises its own error types
                problems.append(f"{fname}: cannot be parsed as safetensors ({e})")
                return
        check_tensors = full or not file_ok
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
                elif check_tensors and hash_bytes(alg, _tensor_bytes(a)) != e.get(alg):
                    problems.append(f"{fname}: tensor {name!r} {alg} mismatch (content altered or damaged)")
        loaded[fname] = arrays
        return
    if fname == STATE_JSON and not size_bad:
        try:
            loaded[fname] = json.loads(buf.tobytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{fname}: cannot be parsed ({e})")


def _tensor_spec(expected: Any) -> dict[str, tuple[str, list[int]]] | None:
    """name -> (dtype, shape) from a manifest's tensor entries, or None when they are malformed."""
    if not isinstance(expected, Mapping):
        return None
    spec = {}
    for name, e in expected.items():
        if not isinstance(e, Mapping):
            return None
        dtype, shape = e.get("dtype"), e.get("shape")
        if not (isinstance(dtype, str) and dtype in streamio.ST_CODES) or not (
            isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        ):
            return None
        spec[name] = (dtype, shape)
    return spec


def _engine_file(fname: str) -> bool:
    """A file of a sharded step that its engine (DCP/orbax) reads, not exporter."""
    return "/" in fname


def _shard_tensors(fpath: Path) -> list[str]:
    """The tensor keys in a DCP safetensors shard's header (to name what a damaged shard holds)."""
    try:
        with open(fpath, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            doc = json.loads(fh.read(n)) if 0 < n <= 100_000_000 else {}
    except (OSError, ValueError):
        return []
    return sorted(k for k in doc if k != "__metadata__") if isinstance(doc, dict) else []


def _load_sharded(
    path: Path, manifest: Mapping[str, Any], st_load: Any, only: set[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Check the files of a sharded step (size + digest, hashed on threads); parse exporter's own files.

    ``only``: check just these files (default: every file, and that nothing else is there).
    """
    alg = _algorithm(manifest)
    assert alg is not None  # _read_manifest checked it
    problems: list[str] = []
    loaded: dict[str, Any] = {}
    files = {n: m for n, m in manifest["files"].items() if only is None or n in only}
    if only is None:
        on_disk = {f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file()} - {MANIFEST}
        for extra in sorted(on_disk - set(files)):
            problems.append(f"{extra}: not in the manifest (added after the commit)")

    def check(fname: str) -> tuple[str, bytes | None, list[str]]:
        meta, fpath = files[fname], path / fname
        if not fpath.is_file():
            return fname, None, [f"{fname}: missing"]
        size = fpath.stat().st_size
        if size != meta.get("bytes"):
            return fname, None, [f"{fname}: {size} bytes, expected {meta.get('bytes')} (truncated or altered)"]
        data: bytes | None = None
        if _engine_file(fname):  # read again by its engine: only hash it here
            digest = (blake3_file if alg == "blake3" else sha256_file)(fpath)
        else:
            buf, digest = streamio.read_hashed(fpath, alg)
            data = buf.tobytes()  # small per-rank files
        if digest == meta.get(alg):
            return fname, data, []
        held = _shard_tensors(fpath) if fname.endswith(".safetensors") and _engine_file(fname) else []
        note = f"; it holds (chunks of) {', '.join(held[:8])}{' ...' if len(held) > 8 else ''}" if held else ""
        return fname, None, [f"{fname}: {alg} mismatch (content altered or damaged){note}"]

    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        results = list(pool.map(check, sorted(files)))
    for fname, data, probs in results:
        problems += probs
        if data is None:
            continue
        try:
            if fname.endswith(".json"):
                loaded[fname] = json.loads(data)
            elif fname.endswith(".safetensors"):
                loaded[fname] = st_load(data)
        except Exception as e:  # json or safetensors errors: the bytes matched the manifest, so this is a bad writer
            problems.append(f"{fname}: cannot be parsed ({e})")
    return loaded, problems


def verify_checkpoint(path: str | os.PathLike[str]) -> list[str]:
    """Check one step directory against its manifest.

    Returns:
        The problems found, one line each (empty list: the checkpoint is valid).

    Raises:
        UsageError: ``path`` is not a path.
    """
    _usage("verify_checkpoint", _path_problem("path", path))
    p = Path(path)
    if not p.is_dir():
        return [f"{p} is not a directory"]
    _m, _l, problems = _load_dir(p, want=None, full=True)
    return sorted(problems)


def _corrupt_error(path: Path, problems: list[str]) -> ExporterError:
    return CheckpointCorruptError.listing(
        f"checkpoint {path} is corrupt or incomplete; load an older step directory, or the checkpoint "
        "directory itself to use its newest valid step:",
        problems,
    )


def _step_dir_arg(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a step-NNNNNNNN directory or a checkpoint directory")
    _not_a_file(path, "checkpoint")


def _try_load(p: Path, groups: tuple[str, ...] | None) -> tuple[Checkpoint | None, list[str]]:
    manifest, loaded, problems = _load_dir(p, want=set(groups) if groups is not None else None)
    if manifest is None or problems:
        return None, sorted(problems)
    ranks: dict[int, tuple[Mapping[str, Any], Mapping[str, np.ndarray]]] = {}
    if _is_sharded(manifest):
        tensors = {"model": _consolidated_model(p, manifest)} if groups is not None and "model" in groups else {}
        for fname, doc in loaded.items():
            m = _RANK_RE.fullmatch(fname)
            if m:
                ranks[int(m.group(1))] = (doc, loaded.get(rank_file(int(m.group(1)), ".safetensors"), {}))
    else:
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
        ranks=ranks,
    )
    return ckpt, []


def _consolidated_model(p: Path, manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The full model tensors of a (verified) sharded step, read by its engine."""
    from exporter import sharded

    entries = manifest["tensors"].get("model", {})
    if manifest["layout"] == "dcp":
        return sharded.read_dcp(p / "dcp", {name: e["key"] for name, e in entries.items()})
    flat = sharded.flatten(sharded.read_orbax(p / "model"))
    return {name: flat[name] for name in entries}


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
        CheckpointError: ``path`` does not exist or is a file.
        UsageError: ``path`` is not a path, or ``groups`` is not a tuple of group names.
    """
    _usage("load_checkpoint", _path_problem("path", path) + _groups_problem(groups))
    p = Path(path)
    _step_dir_arg(p)
    ckpt, problems = _try_load(p, tuple(groups) if groups is not None else None)
    if ckpt is None:
        raise _corrupt_error(p, problems)
    return ckpt


def load_sharded_state(path: str | os.PathLike[str], ranks: Iterable[int]) -> Checkpoint:
    """``state.json`` and the files of ``ranks`` of a sharded step, each size- and hash-checked.

    What a rank needs to resume, without hashing the engine's shard files again: call it
    for a step that :func:`latest_checkpoint` (or :func:`verify_checkpoint`) has just checked.

    Raises:
        CheckpointCorruptError: the manifest or one of those files does not check out.
        CheckpointError: ``path`` is not a sharded step.
    """
    from safetensors.numpy import load as st_load

    p = Path(path)
    manifest, problems = _read_manifest(p)
    if manifest is not None and not problems and not _is_sharded(manifest):
        raise CheckpointError(f"checkpoint {p} is a single-process checkpoint, not a sharded one")
    loaded: dict[str, Any] = {}
    if manifest is not None and not problems:
        want = {STATE_JSON} | {rank_file(r, s) for r in ranks for s in (".json", ".safetensors")}
        loaded, problems = _load_sharded(p, manifest, st_load, only=want)
        problems += [f"{n}: missing from the manifest" for n in sorted(want - set(manifest["files"]))]
    if manifest is None or problems:
        raise _corrupt_error(p, problems)
    ranks_state = {int(m.group(1)): (doc, loaded.get(rank_file(int(m.group(1)), ".safetensors"), {}))
                   for fname, doc in loaded.items() if (m := _RANK_RE.fullmatch(fname))}  # fmt: skip
    return Checkpoint(
        path=p,
        step=int(manifest["step"]),
        model=str(manifest["model"]),
        framework=str(manifest["framework"]),
        tensors={},
        state=loaded.get(STATE_JSON, {}),
        manifest=manifest,
        ranks=ranks_state,
    )


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
        The checkpoint, or None when ``ckpt_dir`` holds no step directories at all (or
        does not exist).

    Raises:
        CheckpointCorruptError: step directories exist but none of them is valid.
        CheckpointError: ``ckpt_dir`` is a file.
        UsageError: an argument of the wrong type (``groups`` not a tuple of group names,
            ``skipped`` not a list, ``warn`` not a bool).
    """
    problems = _path_problem("ckpt_dir", ckpt_dir) + _groups_problem(groups)
    if skipped is not None and not isinstance(skipped, list):
        problems.append(f"skipped must be None or a list (it receives (path, problems) pairs), got {_show(skipped)}")
    if not isinstance(warn, bool):
        problems.append(f"warn must be True or False, got {_show(warn)}")
    _usage("latest_checkpoint", problems)
    root = Path(ckpt_dir)
    _not_a_file(root, "checkpoint directory")
    if groups is not None:
        groups = tuple(groups)
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
        raise CheckpointCorruptError.listing(
            f"no valid checkpoint in {root}; every step directory failed verification (move them away "
            "to start over):",
            [f"invalid {p.name}: {'; '.join(probs)}" for p, probs in bad],
        )
    return result


def list_checkpoints(ckpt_dir: str | os.PathLike[str], *, verify: bool = True) -> list[CheckpointInfo]:
    """Every step directory in ``ckpt_dir``, oldest first, with its validity.

    ``verify=False`` only reads manifests (no hashing), so ``valid`` then means "manifest ok".
    A missing ``ckpt_dir`` holds none.

    Raises:
        UsageError: ``ckpt_dir`` is not a path or ``verify`` not a bool.
        CheckpointError: ``ckpt_dir`` is a file.
    """
    problems = _path_problem("ckpt_dir", ckpt_dir)
    if not isinstance(verify, bool):
        problems.append(f"verify must be True or False, got {_show(verify)}")
    _usage("list_checkpoints", problems)
    _not_a_file(Path(ckpt_dir), "checkpoint directory")
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
                total_bytes=sum(f.stat().st_size for f in p.rglob("*") if f.is_file()),
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

    Raises:
        UsageError: ``path`` is not a path.
    """
    _usage("is_checkpoint", _path_problem("path", path))
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
        canonical state, for both torch and flax runs; for a sharded step the model tensors
        consolidated from its shards by their engine: canonical names for DCP steps, flax
        variable paths such as ``params/hidden/kernel`` for orbax steps).

    Raises:
        CheckpointCorruptError: the step directory (or every step directory) is damaged.
        CheckpointError: no checkpoint at ``path`` (missing, a file, or no step directories).
        StateMismatchError: the checkpoint was trained for a different model than ``model``.
        UsageError: ``path`` is not a path or ``model`` not None/a registry name.
    """
    problems = _path_problem("path", path)
    if model is not None and not (isinstance(model, str) and model):
        problems.append(f"model must be None or a registry name (a non-empty str), got {_show(model)}")
    _usage("model_checkpoint", problems)
    p = Path(path)
    _step_dir_arg(p)
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
        name -> array, for both torch and flax runs (single-process flax runs are stored
        canonically; multi-device flax steps hold flax variable paths, which
        :func:`exporter.rebuild.prepare_state` maps like any flax state).

    Raises:
        As :func:`model_checkpoint`.
    """
    return dict(model_checkpoint(path, model=model).group("model"))
