"""jax adapter: the registry's flax build, ``module.apply`` under ``jax.jit``.

This module imports jax and flax at the top; it is itself imported only on demand (by
``exporter.runtimes.base.load_runtime`` or directly), so ``import exporter.runtimes``
stays cheap.  One compilation per distinct input shape (a sweep of four batch sizes
compiles four times).  :meth:`JaxRuntime.prepare` compiles the shapes of a whole sweep
ahead, several at a time (XLA compiles release the GIL; one thread per usable core): the
executables are the ones ``jax.jit`` would build (same lowering, same compile options),
so the outputs are the same bits, only the compiles overlap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from exporter.deps import require
from exporter.runtimes.base import Runtime, check_arrays, name_outputs, spec_io

jax = require("jax", "runtime 'jax'")
require("flax", "runtime 'jax'")

if TYPE_CHECKING:  # pragma: no cover
    from exporter.models.registry import ModelSpec

__all__ = ["JaxRuntime"]


def _signature(args: Sequence[np.ndarray]) -> tuple[tuple[tuple[int, ...], str], ...]:
    """What a compiled executable is specific to: each input's shape and dtype."""
    return tuple((tuple(a.shape), a.dtype.str) for a in args)


def _cores() -> int:
    """Threads for XLA compiles: ``EXPORTER_THREADS`` when set (an ``export --jobs`` worker's
    share of the cores; the test suite's 1), else the cores this process may use."""
    given = os.environ.get("EXPORTER_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    try:
        return max(len(os.sched_getaffinity(0)), 1)  # a pinned process (benchmarks P4) gets its cores only
    except (AttributeError, OSError):  # pragma: no cover - no affinity API
        return os.cpu_count() or 1


class JaxRuntime(Runtime):
    """The flax build of a registry model: jitted ``apply`` with ``spec.flax_apply_kwargs``.

    Args:
        spec: the registry entry.
        canonical: canonical state, converted to flax variables by ``exporter.rebuild``.

    Raises:
        StateMismatchError: the state does not fit the model.
        UsageError: the model has no flax build.
    """

    name: ClassVar[str] = "jax"
    artifact_kind: ClassVar[str] = "state"

    def __init__(self, spec: ModelSpec, canonical: Mapping[str, np.ndarray]) -> None:
        from exporter.rebuild import flax_variables

        self._init(spec, flax_variables(spec, canonical))

    @classmethod
    def from_variables(cls, spec: ModelSpec, variables: Mapping[str, Any]) -> JaxRuntime:
        """Wrap flax variables (``{"params": ..., "batch_stats": ...}``) directly.

        Raises:
            UsageError: the model has no flax build.
        """
        self = cls.__new__(cls)
        self._init(spec, variables)
        return self

    def _init(self, spec: ModelSpec, variables: Mapping[str, Any]) -> None:
        module = spec.factory("flax")()
        self.spec = spec
        self.variables = variables
        self.inputs, self.outputs = spec_io(spec)
        self.source = f"model {spec.name!r}, flax build"
        kwargs = dict(spec.flax_apply_kwargs)

        def apply(variables: Any, *args: Any) -> Any:
            return module.apply(variables, *args, **kwargs)

        self._apply = jax.jit(apply)
        self._compiled: dict[tuple[tuple[tuple[int, ...], str], ...], Any] = {}
        self._pending: dict[tuple[tuple[tuple[int, ...], str], ...], Future[Any]] = {}

    def prepare(self, feeds: Sequence[Mapping[str, np.ndarray]], *, wait: bool = True) -> None:
        """Compile the jitted ``apply`` for every distinct input shape of ``feeds``: traced
        and lowered one after the other here, compiled in up to one thread per usable core.

        ``wait=False`` returns once they are lowered; the compiles go on in the background
        (one core fewer: the caller's work goes on meanwhile) and :meth:`run` waits for the
        one it needs.  A feed whose inputs do not fit, or whose
        tracing or compile fails, is left out: :meth:`run` then goes through ``jax.jit`` and
        reports the problem as before."""
        todo: dict[tuple[tuple[tuple[int, ...], str], ...], list[np.ndarray]] = {}
        for feed in feeds:
            arrays, problems = check_arrays(self.inputs, feed)
            if problems:
                continue
            args = [arrays[i.name] for i in self.inputs]
            key = _signature(args)
            if key not in self._compiled and key not in self._pending and key not in todo:
                todo[key] = args
        lowered = []
        for key, args in todo.items():
            try:
                lowered.append((key, self._apply.lower(self.variables, *args)))
            except Exception:  # noqa: BLE001 - the model's own error: run() raises it as a RunError
                continue
        if not lowered:
            return

        def compile_one(low: Any) -> Any:
            try:
                return low.compile()
            except Exception:  # noqa: BLE001 - XLA's error: run() raises it as a RunError
                return None

        # in the background, leave one core to the caller (what it does meanwhile is why it did not wait)
        cores = _cores() if wait else max(_cores() - 1, 1)
        pool = ThreadPoolExecutor(max_workers=min(len(lowered), cores), thread_name_prefix="exporter-xla-compile")
        self._pending.update((key, pool.submit(compile_one, low)) for key, low in lowered)
        pool.shutdown(wait=False)
        if wait:
            for key, _low in lowered:
                self._take(key)

    def _take(self, key: tuple[tuple[tuple[int, ...], str], ...]) -> Any:
        """The executable compiled for ``key`` (waiting for a pending compile), else None."""
        pending = self._pending.pop(key, None)
        if pending is not None:
            compiled = pending.result()
            if compiled is not None:
                self._compiled[key] = compiled
        return self._compiled.get(key)

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [inputs[i.name] for i in self.inputs]
        compiled = self._take(_signature(args))
        try:  # tracing runs the model's own code: its errors surface here, as do XLA's
            result = jax.block_until_ready((compiled or self._apply)(self.variables, *args))
        except Exception as e:
            raise self.run_error(e) from e
        outs = name_outputs(self.spec, "flax", result, (jax.Array, np.ndarray))
        return {n: np.asarray(jax.device_get(o)) for n, o in outs.items()}

    def close(self) -> None:
        self.variables = {}
        self._compiled = {}
        self._pending = {}  # a compile still running finishes in its thread and is dropped
