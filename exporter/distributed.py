"""Processes for distributed training: starting ranks, gloo collectives, DDP/FSDP2, DCP state I/O.

Ranks are found from the environment torch uses for rendezvous (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``): set by ``torchrun`` or by :func:`launch`, which
starts ``nproc`` copies of a command on this machine with those variables (127.0.0.1
and a free port), waits for them, and stops every rank as soon as one fails.  A started
rank dies with its launcher (Linux ``PR_SET_PDEATHSIG``), so no rank outlives the process
that holds the checkpoint directory's lock.

Collectives run over gloo on the CPU.  :func:`gather_json` / :func:`broadcast_json` move
small JSON documents between ranks as byte tensors (no pickle).  :func:`wrap` applies
DDP or FSDP2 (``fully_shard``); :func:`state_dicts` / :func:`set_state` use
``torch.distributed.checkpoint.state_dict``; :func:`save_dcp` / :func:`load_dcp` write and
read a state of tensors with ``torch.distributed.checkpoint`` through its
``HuggingFaceStorageWriter``/``Reader`` (one safetensors file per rank with DCP's
sharding information; no ``.metadata`` pickle), so a step saved at one world size loads
at another.

This module never decides what a checkpoint holds or when it is complete: that is
:mod:`exporter.checkpoint` (``commit_sharded``) and :mod:`exporter.training`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from exporter.deps import require
from exporter.errors import CheckpointError, MissingDependencyError

__all__ = [
    "STRATEGIES",
    "ENV_KEYS",
    "LAUNCHED_ENV",
    "Rank",
    "from_env",
    "launch",
    "die_with_parent",
    "init",
    "shutdown",
    "gather_json",
    "broadcast_json",
    "all_mean",
    "barrier",
    "wrap",
    "state_dicts",
    "set_state",
    "save_dcp",
    "load_dcp",
    "rank_shards",
]

STRATEGIES = ("ddp", "fsdp")
ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: Set by :func:`launch` in every rank it starts: the launcher's pid.
LAUNCHED_ENV = "EXPORTER_LAUNCHER_PID"
_TIMEOUT = timedelta(seconds=120)
_PURPOSE = "distributed training (--nproc)"


@dataclass(frozen=True)
class Rank:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    launched: bool  # started by exporter's launch() (else by torchrun or another launcher)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(env: Mapping[str, str] | None = None) -> Rank | None:
    """This process's rank from the rendezvous variables, or None when they are not all set.

    Raises:
        CheckpointError: the variables are set but malformed.
    """
    env = os.environ if env is None else env
    if not all(env.get(k) for k in ENV_KEYS):
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise CheckpointError(
            f"malformed rendezvous environment (RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}); "
            "start the job with torchrun or let exporter start it (--nproc)"
        ) from None
    if not (world >= 1 and 0 <= rank < world):
        raise CheckpointError(f"rendezvous environment has RANK={rank} outside WORLD_SIZE={world}")
    return Rank(rank, world, local, launched=bool(env.get(LAUNCHED_ENV)))


# --------------------------------------------------------------------------------------
# starting ranks
# --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _how(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def launch(cmd: Sequence[str], nproc: int, *, env: Mapping[str, str] | None = None, what: str = "training") -> None:
    """Run ``nproc`` copies of ``cmd`` as ranks 0..nproc-1 on this machine; return when all succeeded.

    Every rank gets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``, ``OMP_NUM_THREADS=1`` unless set,
    :data:`LAUNCHED_ENV`, and ``env``.  Output goes to this process's stdout/stderr.  When a
    rank fails, the others are killed at once (they would wait on it in a collective).

    Raises:
        CheckpointError: a rank failed (which one, and how); every rank has stopped.
    """
    port = _free_port()
    base = dict(os.environ)
    base.update(env or {})
    base.setdefault("OMP_NUM_THREADS", "1")
    base.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    )
    base[LAUNCHED_ENV] = str(os.getpid())
    procs: list[subprocess.Popen[bytes]] = []
    failed: tuple[int, int] | None = None
    try:
        for r in range(nproc):
            procs.append(subprocess.Popen(list(cmd), env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}))
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, rc) for r, rc in enumerate(codes) if rc not in (None, 0)]
            if bad and failed is None:
                failed = bad[0]
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            if all(rc is not None for rc in codes):
                break
            time.sleep(0.05)
    finally:
        for p in procs:  # KeyboardInterrupt or an error while starting: leave no rank behind
            if p.poll() is None:
                p.kill()
                p.wait()
    if failed is not None:
        r, rc = failed
        who = f"{what} rank {r} of {nproc} {_how(rc)}; every other rank was stopped" if nproc > 1 else f"the {what} process {_how(rc)}"
        raise CheckpointError(f"{who}. Its output is above. Run the same command again to resume from the newest committed checkpoint")


def die_with_parent() -> None:
    """In a rank started by :func:`launch`: die when the launcher dies (it holds the directory's lock)."""
    parent = os.environ.get(LAUNCHED_ENV)
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != parent:  # the launcher died before prctl took effect
        os._exit(1)


# --------------------------------------------------------------------------------------
# process group and collectives
# --------------------------------------------------------------------------------------
def _dist() -> Any:
    require("torch", _PURPOSE)
    return require("torch.distributed", _PURPOSE)


def init(rank: Rank) -> None:
    """Join the job's gloo process group (rendezvous through the environment)."""
    dist = _dist()
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank.rank, world_size=rank.world_size, timeout=_TIMEOUT)


def shutdown() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    _dist().barrier()


def gather_json(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (plain JSON), in rank order, on every rank."""
    torch = require("torch", _PURPOSE)
    dist = _dist()
    data = torch.frombuffer(bytearray(json.dumps(obj, allow_nan=False).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(bufs, padded)
    return [json.loads(bytes(b[: int(s.item())].tolist())) for b, s in zip(bufs, sizes)]


def broadcast_json(obj: Any) -> Any:
    """Rank 0's ``obj`` (plain JSON) on every rank."""
    return gather_json(obj if _dist().get_rank() == 0 else None)[0]


def all_mean(value: float) -> float:
    """The mean of ``value`` over the ranks (float64, so every rank gets the same bits)."""
    torch = require("torch", _PURPOSE)
    dist = _dist()
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


# --------------------------------------------------------------------------------------
# DDP / FSDP2 and their state
# --------------------------------------------------------------------------------------
def wrap(module: Any, strategy: str, world_size: int) -> Any:
    """The module wrapped for ``strategy``: ``DistributedDataParallel``, or sharded in place by ``fully_shard``."""
    assert strategy in STRATEGIES, strategy
    require("torch", _PURPOSE)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module, mesh=init_device_mesh("cpu", (world_size,)))


def state_dicts(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``get_state_dict``: (model state, optimizer state) keyed by unwrapped parameter names.

    Sharded (DTensor) values under FSDP, full tensors under DDP; the optimizer's state is
    initialised first when it has none yet (so a fresh optimizer is a load template).
    """
    require("torch", _PURPOSE)
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def set_state(model: Any, optimizer: Any, model_state: Mapping[str, Any], optim_state: Mapping[str, Any]) -> None:
    require("torch", _PURPOSE)
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=dict(model_state), optim_state_dict=dict(optim_state))


def _dcp() -> Any:
    """torch.distributed.checkpoint, with the safetensors storage that writes one shard per rank."""
    dcp = require("torch.distributed.checkpoint", _PURPOSE)
    writer = getattr(dcp, "HuggingFaceStorageWriter", None)
    if writer is None or "save_distributed" not in inspect.signature(writer).parameters:
        torch = require("torch", _PURPOSE)
        raise MissingDependencyError(
            f"{_PURPOSE} needs torch.distributed.checkpoint.HuggingFaceStorageWriter(save_distributed=...), which torch "
            f"{torch.__version__} lacks; install a newer torch (developed and tested with 2.13)"
        )
    return dcp


def save_dcp(state: Mapping[str, Any], directory: Path) -> None:
    """``dcp.save`` of a (nested) state of tensors: every rank writes its own safetensors shard, fsynced."""
    dcp = _dcp()
    dcp.save(dict(state), storage_writer=dcp.HuggingFaceStorageWriter(str(directory), save_distributed=True))


def load_dcp(state: dict[str, Any], directory: Path) -> None:
    """``dcp.load`` into ``state`` in place (resharding to this job's world size and strategy)."""
    dcp = _dcp()
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(directory)))


def rank_shards(directory: Path, rank: int) -> list[str]:
    """The shard files ``rank`` wrote in a :func:`save_dcp` directory (names relative to it).

    ``HuggingFaceStorageWriter`` numbers a rank's files ``shard-<rank + 1>-...``; a file
    no rank reports is caught by :func:`exporter.checkpoint.commit_sharded`.
    """
    return sorted(p.name for p in directory.glob(f"shard-{rank + 1:05d}-*.safetensors"))
