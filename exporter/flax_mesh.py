"""JAX devices for data-parallel training: a 1-D mesh, FSDP-style shardings, orbax save/restore.

On a CPU the devices are XLA host devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=P``
must be set before jax is first imported, so :mod:`exporter.training` runs such a job in a
subprocess (:data:`DEVICES_ENV` tells it the count it was started with).

Shardings are a function of an array's shape alone (:func:`sharding_for`), so parameters,
their optimizer moments and a restored checkpoint always agree: the batch dimension of
inputs is split over the ``"data"`` axis; a parameter is split along its largest dimension
that the device count divides (FSDP-style), else replicated; scalars are replicated.

orbax writes and reads the arrays (``StandardCheckpointer``): each device's shard is
written by orbax, and restoring into a template with other shardings (another device
count) reshards.  Trees handed to orbax are plain nested dicts of arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from exporter.deps import require
from exporter.errors import CheckpointError

__all__ = ["DEVICES_ENV", "AXIS", "xla_flags", "mesh", "sharding_for", "shardings", "place", "batch", "save", "restore"]

DEVICES_ENV = "EXPORTER_JAX_DEVICES"
AXIS = "data"
_PURPOSE = "training with framework='flax' on several devices (--devices)"


def xla_flags(devices: int, current: str | None) -> str:
    """``XLA_FLAGS`` with the host-platform device count set to ``devices`` (other flags kept)."""
    kept = [f for f in (current or "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    # first: XLA stops reading the variable at a malformed entry (such as one without "--")
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *kept])


def mesh(devices: int) -> Any:
    """A 1-D mesh over the first ``devices`` JAX devices, axis :data:`AXIS`.

    Raises:
        CheckpointError: fewer devices exist (jax was imported before XLA_FLAGS was set).
    """
    jax = require("jax", _PURPOSE)
    np = require("numpy", _PURPOSE)
    have = jax.devices()
    if len(have) < devices:
        raise CheckpointError(
            f"{devices} JAX devices were asked for but this process has {len(have)} ({have[0].platform}); on a CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax is imported"
        )
    from jax.sharding import Mesh

    return Mesh(np.array(have[:devices]), (AXIS,))


def sharding_for(m: Any, shape: tuple[int, ...]) -> Any:
    """Split the largest dimension that the device count divides over :data:`AXIS`; else replicate."""
    from jax.sharding import NamedSharding, PartitionSpec

    n = m.devices.size
    dims = sorted((d for d in range(len(shape)) if shape[d] % n == 0 and shape[d] >= n), key=lambda d: (-shape[d], d))
    if n == 1 or not dims:
        return NamedSharding(m, PartitionSpec())
    spec: list[str | None] = [None] * len(shape)
    spec[dims[0]] = AXIS
    return NamedSharding(m, PartitionSpec(*spec))


def shardings(m: Any, tree: Any) -> Any:
    """:func:`sharding_for` of every leaf of ``tree``."""
    jax = require("jax", _PURPOSE)
    return jax.tree_util.tree_map(lambda a: sharding_for(m, tuple(a.shape)), tree)


def place(m: Any, tree: Any) -> Any:
    """``tree`` on the mesh, every leaf with its :func:`sharding_for`."""
    jax = require("jax", _PURPOSE)
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding_for(m, tuple(a.shape))), tree)


def batch(m: Any, x: Any) -> Any:
    """An input array with its leading (batch) dimension split over the devices."""
    jax = require("jax", _PURPOSE)
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.device_put(x, NamedSharding(m, PartitionSpec(AXIS)))


def save(tree: Any, path: Path) -> None:
    """orbax ``StandardCheckpointer``: write ``tree`` (sharded arrays) to ``path`` (which must not exist)."""
    ocp = require("orbax.checkpoint", _PURPOSE)
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(Path(os.path.abspath(path)), tree)  # orbax misreads relative paths
        ckptr.wait_until_finished()
    finally:
        ckptr.close()


def restore(path: Path, template: Any, m: Any) -> Any:
    """Read an orbax item into arrays shaped like ``template``, placed with this mesh's shardings."""
    jax = require("jax", _PURPOSE)
    ocp = require("orbax.checkpoint", _PURPOSE)
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_for(m, tuple(a.shape))), template
    )
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(Path(os.path.abspath(path)), abstract)
    finally:
        ckptr.close()
