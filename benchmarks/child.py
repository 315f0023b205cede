"""One benchmark case in a fresh interpreter: ``python -m benchmarks.child CASE '{json params}'``.

Each case imports what it needs first (not timed), then measures one operation: wall time
and peak RSS over the operation (:class:`benchmarks.common.PeakRSS`: the baseline is this
process after its imports).  The last stdout line is the JSON result.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import PeakRSS

CASES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def case(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    CASES[fn.__name__] = fn
    return fn


class Measure:
    """``with Measure() as m: ...`` -> wall seconds and peak RSS of the block."""

    def __enter__(self) -> Measure:
        import gc

        gc.collect()
        self.rss = PeakRSS()
        self.rss.start()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t
        self.rss.stop()

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, **self.rss.to_dict()}


# ----------------------------------------------------------------------------- inputs
@case
def make_state(p: dict[str, Any]) -> dict[str, Any]:
    """Write the wide MLP's seeded state as safetensors (input preparation, not measured)."""
    from benchmarks import wide

    path = Path(p["path"])
    if path.exists() and p.get("reuse", True):
        return {"bytes": wide.weight_bytes(p["width"], p["depth"]), "reused": True}
    return {"bytes": wide.write_state(path, p["width"], p["depth"], seed=p.get("seed", 0)), "reused": False}


# ----------------------------------------------------------------------------- P2
def _p2_imports(p: dict[str, Any]) -> Any:
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import exporter.rebuild  # noqa: F401
    import exporter.state  # noqa: F401
    from benchmarks import wide

    return wide.spec(p["width"], p["depth"])


@case
def p2_ours(p: dict[str, Any]) -> dict[str, Any]:
    """exporter.state.load_state -> rebuild.prepare_state -> rebuild.torch_module."""
    from exporter import rebuild, state

    spec = _p2_imports(p)
    with Measure() as m:
        raw = state.load_state(p["path"])
        canonical, _ = rebuild.prepare_state(spec, raw, source=p["path"])
        del raw
        module = rebuild.torch_module(spec, canonical)
        del canonical
    first = next(iter(module.parameters()))
    return {**m.to_dict(), "check": float(first.detach().reshape(-1)[:16].sum())}


@case
def p2_anchor(p: dict[str, Any]) -> dict[str, Any]:
    """safetensors.torch.load_model into an already built model (construction not timed)."""
    import safetensors.torch

    spec = _p2_imports(p)
    module = spec.torch_factory()
    with Measure() as m:
        safetensors.torch.load_model(module, p["path"])
    first = next(iter(module.parameters()))
    return {**m.to_dict(), "check": float(first.detach().reshape(-1)[:16].sum())}


@case
def p2_anchor_build(p: dict[str, Any]) -> dict[str, Any]:
    """Model construction + safetensors.torch.load_model (what a user writes)."""
    import safetensors.torch

    spec = _p2_imports(p)
    with Measure() as m:
        module = spec.torch_factory()
        safetensors.torch.load_model(module, p["path"])
    first = next(iter(module.parameters()))
    return {**m.to_dict(), "check": float(first.detach().reshape(-1)[:16].sum())}


# ----------------------------------------------------------------------------- P3
@case
def p3_anchor(p: dict[str, Any]) -> dict[str, Any]:
    """The bare peer pipeline for the same models: torch.onnx.export + jax2onnx.to_onnx + onnxruntime runs.

    Per model: the torch build -> ``torch.onnx.export(dynamo=True)`` with a dynamic batch
    (same opset, input/output names and example sizes as ours) to a file; the flax build
    (``init``) -> ``jax2onnx.to_onnx`` with symbolic dims to a file; one onnxruntime
    session per file, run at every batch size of the sweep.  No reference runs, no
    comparison, no bundle: what a user's own script does before checking anything.
    Timed as a whole process by the caller (imports included, as for ours).  ``cases``
    (model -> framework -> list of dims) makes the onnxruntime runs the very cases our
    sweep ran (read from our bundles' manifests); default: each batch size at the
    registry's default dims.
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    import jax
    import jax2onnx
    from exporter.models import registry

    out = Path(p["dir"])
    opset = int(p.get("opset", 20))
    batches = p.get("batches", [1, 2, 7, 64])
    names = p.get("models") or [n for n in registry.names() if not n.startswith("bench_")]
    runs = 0
    for name in names:
        spec = registry.get(name)
        dyn = spec.dynamic_dims()
        export_dims = {d: max(int(spec.dims.get(d, 2)), 2) + i for i, d in enumerate(dyn)}  # distinct sizes >= 2
        files = []
        if "torch" in spec.frameworks and "torch" in p.get("frameworks", ["torch", "flax"]):
            module = spec.torch_factory().eval()
            ex = spec.example_inputs(export_dims)
            args = tuple(torch.from_numpy(ex[t.name]) for t in spec.inputs)
            # one Dim per named dim, Dim.AUTO for a derived one (gpt2's "past + seq"), as any script must
            from exporter import dimexpr

            shapes = dimexpr.torch_dynamic_shapes([t.shape for t in spec.inputs], torch)
            f = out / name / "torch.onnx"
            f.parent.mkdir(parents=True, exist_ok=True)
            torch.onnx.export(
                module,
                args,
                str(f),
                dynamo=True,
                input_names=[t.name for t in spec.inputs],
                output_names=list(spec.outputs),
                opset_version=opset,
                dynamic_shapes=shapes,
            )
            files.append((f, False))
        if "flax" in spec.frameworks and "flax" in p.get("frameworks", ["torch", "flax"]):
            fmod = spec.flax_factory()
            kwargs = dict(spec.flax_apply_kwargs)
            ex = spec.example_inputs(export_dims)
            narrowed = {k: (v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in ex.items()}
            init = jax.jit(lambda key, *xs: fmod.init(key, *xs, **kwargs))  # jitted: the fast way to get weights
            variables = init(jax.random.PRNGKey(0), *(narrowed[t.name] for t in spec.inputs))
            scope = jax.export.SymbolicScope()
            avals = [
                jax.ShapeDtypeStruct(
                    jax.export.symbolic_shape(", ".join(str(d) for d in t.shape), scope=scope),
                    np.int32 if t.dtype == "int64" else np.dtype(t.dtype),
                )
                for t in spec.inputs
            ]
            f = out / name / "flax.onnx"
            f.parent.mkdir(parents=True, exist_ok=True)
            jax2onnx.to_onnx(
                lambda *xs: fmod.apply(variables, *xs, **kwargs),
                avals,
                model_name=name,
                opset=opset,
                input_names=[t.name for t in spec.inputs],
                output_names=list(spec.outputs),
                return_mode="file",
                output_path=str(f),
            )
            # jax2onnx 0.17 leaves stale NHWC shape hints on values its layout pass made NCHW
            # (resnet: onnxruntime refuses the file); dropping the hints is the least a script must do
            import onnx

            proto = onnx.load(str(f), load_external_data=False)
            if len(proto.graph.value_info):
                del proto.graph.value_info[:]
                onnx.save(proto, str(f))
            files.append((f, True))
        for f, narrow in files:
            sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
            fw = "flax" if narrow else "torch"
            cases = (p.get("cases") or {}).get(name, {}).get(fw) or [{**spec.dims, "batch": b} for b in batches]
            for dims in cases:
                x = spec.example_inputs(dims, seed=0)
                if narrow:
                    x = {k: (v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in x.items()}
                sess.run(None, x)
                runs += 1
    return {"models": names, "runs": runs}


# ----------------------------------------------------------------------------- P5
def _raw_write(files: dict[str, bytes], target: Path) -> None:
    """The anchor's save: the same bytes into the same file names, each fsynced, then the directory."""
    target.mkdir(parents=True)
    for name, data in files.items():
        fd = os.open(target / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raw_read(d: Path) -> int:
    """The anchor's load: read every file of the directory into memory."""
    n = 0
    for f in sorted(d.iterdir()):
        with open(f, "rb") as fh:
            n += len(fh.read())
    return n


def _raw_readinto(d: Path) -> int:
    """The strict anchor's load: every file into a new numpy buffer of its size (``readinto``).

    The same allocation as exporter's loader (numpy asks for transparent huge pages, which
    makes filling fresh memory several times cheaper than ``read()`` into new bytes), so
    the ratio shows only what hashing and parsing cost.
    """
    import numpy as np

    n = 0
    for f in sorted(d.iterdir()):
        with open(f, "rb", buffering=0) as fh:
            buf = np.empty(os.fstat(fh.fileno()).st_size, np.uint8)
            view = memoryview(buf)
            while view and (got := fh.readinto(view)):
                view = view[got:]
            n += len(buf)
    return n


@case
def p5_checkpoint(p: dict[str, Any]) -> dict[str, Any]:
    """Training checkpoint save/load (exporter.checkpoint) vs raw write+fsync / raw read of the same bytes.

    The checkpoint is what the torch training driver writes: the wide MLP's canonical state,
    AdamW state after one step (two moments per parameter, encoded with ``encode_tree``),
    scheduler state, and RNG states.  Rounds interleave anchor and ours.  ``cold``: the
    page cache is emptied of the files (posix_fadvise DONTNEED) before each load.
    """
    import numpy as np
    import torch

    from benchmarks import wide
    from benchmarks.common import evict
    from exporter import checkpoint as ckpt
    from exporter.treecodec import encode_tree
    from exporter import rebuild

    spec = wide.spec(p["width"], p["depth"])
    torch.manual_seed(0)
    module = rebuild.torch_module(spec, rebuild.init_state(spec), copy=True).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)
    x = torch.randn(4, p["width"])
    module(x).square().mean().backward()
    opt.step()
    sched.step()
    model = rebuild.canonical_from_torch(module, spec)
    opt_tensors: dict[str, np.ndarray] = {}
    doc = encode_tree({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, opt_tensors)
    rng = {"torch": torch.get_rng_state().numpy().copy(), "order": np.arange(1024, dtype=np.int64)}
    groups = {"model": model, "optimizer": opt_tensors, "rng": rng}
    state = {"optimizer": doc, "step": 1, "epoch": 0, "index": 4}
    del module, opt, x
    root = Path(p["dir"])
    ours_dir = root / "ckpt"
    warmup = ckpt.save_checkpoint(ours_dir, 0, model=spec.name, framework="torch", tensors=groups, state=state)
    files = {f.name: f.read_bytes() for f in sorted(warmup.iterdir())}  # the anchor writes these bytes
    nbytes = sum(len(b) for b in files.values())
    import shutil

    shutil.rmtree(warmup)
    out: dict[str, list[float]] = {
        k: [] for k in ("save", "save_raw", "load", "load_raw", "load_into", "load_cold", "load_raw_cold", "load_into_cold")
    }
    for r in range(int(p.get("rounds", 5))):
        step = r + 1
        raw_dir = root / f"raw-{step}"

        def ours_save() -> Path:
            t = time.perf_counter()
            d = ckpt.save_checkpoint(ours_dir, step, model=spec.name, framework="torch", tensors=groups, state=state)
            out["save"].append(time.perf_counter() - t)
            return d

        def raw_save() -> None:
            t = time.perf_counter()
            _raw_write(files, raw_dir)
            out["save_raw"].append(time.perf_counter() - t)

        if r % 2:  # alternate who goes first
            raw_save()
            step_dir = ours_save()
        else:
            step_dir = ours_save()
            raw_save()
        for suffix, cold in (("", False), ("_cold", True)):
            if cold:
                evict(raw_dir)
                evict(step_dir)
            t = time.perf_counter()
            got = _raw_read(raw_dir)
            out["load_raw" + suffix].append(time.perf_counter() - t)
            assert got == nbytes, (got, nbytes)
            if cold:
                evict(raw_dir)
            t = time.perf_counter()
            got = _raw_readinto(raw_dir)
            out["load_into" + suffix].append(time.perf_counter() - t)
            assert got == nbytes, (got, nbytes)
            t = time.perf_counter()
            loaded = ckpt.load_checkpoint(step_dir)
            out["load" + suffix].append(time.perf_counter() - t)
            assert loaded.step == step
            del loaded
        shutil.rmtree(raw_dir)
        shutil.rmtree(step_dir)
    return {"bytes": nbytes, "model_bytes": int(sum(a.nbytes for a in model.values())), "seconds": out}


# ----------------------------------------------------------------------------- P6
@case
def p6_export(p: dict[str, Any]) -> dict[str, Any]:
    """``exporter.export`` of the wide MLP from a safetensors checkpoint, ONNX external data; peak RSS.

    Params: width, depth, path (the checkpoint), out, framework, external_data (None =
    automatic, over 2 GiB), batch_sizes.
    """
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
    import safetensors  # noqa: F401
    import torch  # noqa: F401

    import exporter
    from benchmarks import wide
    from exporter import bundle, onnx_export, parity, rebuild, state  # noqa: F401

    spec = wide.spec(p["width"], p["depth"])
    fw = p.get("framework", "torch")
    if fw == "flax":
        import flax  # noqa: F401
        import jax  # noqa: F401
        import jax2onnx  # noqa: F401
    # Baseline = this process after one small export of the same kind: every library the
    # export imports lazily (torch.export, torch.onnx's dynamo exporter, onnxscript, sympy,
    # ...) is loaded, so the figure counts the model's memory, not code.
    import tempfile

    small = wide.spec(64, 2)
    with tempfile.TemporaryDirectory() as tmp:
        small_state = Path(tmp) / "small.safetensors"
        wide.write_state(small_state, 64, 2)
        exporter.export(small.name, checkpoint=small_state, framework=fw, out=Path(tmp) / "out", external_data=True)
    with Measure() as m:
        report = exporter.export(
            spec.name,
            checkpoint=p["path"],
            framework=fw,
            out=p["out"],
            external_data=p.get("external_data"),
            batch_sizes=p.get("batch_sizes"),
        )
    r = report.results[0]
    return {
        **m.to_dict(),
        "ok": bool(report),
        "external_data": r.external_data,
        "stages": {k: round(v, 3) for k, v in r.seconds.items()},
        "failures": report.failures()[:5],
    }


# ----------------------------------------------------------------------------- P4
def _calibrate(fn: Callable[[], Any], budget: float) -> int:
    """How many calls of ``fn`` take about ``budget`` seconds (at least 1)."""
    for _ in range(3):
        fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt > budget / 4 or n >= 1 << 16:
            return max(1, round(n * budget / max(dt, 1e-9)))
        n *= 2


def _per_call(fn: Callable[[], Any], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


@case
def _p4_variants(
    spec: Any, module: Any, path: Path, out: Path, names: list[str], threads: int,
    runners: dict[str, Callable[[dict[str, Any]], Any]], pairs: dict[str, tuple[str, str]],
) -> dict[str, Any]:
    """Make each variant of the torch export (judged against torch eager on the default
    sweep, as ``export --variants`` does) and add its onnxruntime session to the runners:
    pairs ``torch.<variant>`` (vs torch eager) and ``torch.<variant>.vs_fp32``."""
    from exporter import parity, variants
    from exporter.runtimes.onnxruntime import OnnxRuntime
    from exporter.runtimes.torch import TorchRuntime

    if not names:
        return {}
    runs = parity.plan_runs(spec)
    reference = TorchRuntime.from_module(spec, module)
    expected = [reference.run(feed) for _label, _dims, feed in runs]
    info: dict[str, Any] = {}
    for v in names:
        res = variants.apply(v, spec, path, out / f"torch-{v}" / "model.onnx", runs=runs, expected=expected,
                             framework="torch", threads=threads or 1)  # fmt: skip
        info[v] = {"status": res.status, "reason": res.reason, "failures": res.failures(),
                   "metrics": None if res.metrics is None else res.metrics.to_dict(),
                   "details": None if res.info is None else {k: res.info.details.get(k) for k in ("excluded", "model_bytes", "fusions")}}  # fmt: skip
        if res.path is None or res.parity is None:  # skipped, or no model onnxruntime can open
            continue
        key = f"onnxruntime (torch export, {v})"
        runners[key] = lambda x, s=OnnxRuntime(res.path, intra_op_threads=threads or None)._session: s.run(None, x)
        pairs[f"torch.{v}"] = (key, "torch eager")
        pairs[f"torch.{v}.vs_fp32"] = (key, "onnxruntime (torch export)")
    return info


def p4_model(p: dict[str, Any]) -> dict[str, Any]:
    """Latency of one registry model: onnxruntime (our export + session settings) vs torch eager / jax.jit.

    Params: model, dir (where the exports go / are reused), threads (1, or 0 = each
    runtime's default), batches, rounds, budget (seconds per timed block), frameworks,
    variants (of the torch export: ``exporter.variants`` names, timed beside it).
    Rounds are interleaved: in each round every (batch, runtime) pair runs one block,
    with a short pause between blocks so idle worker threads of the previous runtime are
    asleep.
    """
    threads = int(p.get("threads", 1))
    if threads == 1 and hasattr(os, "sched_setaffinity"):
        # One core for the whole process, set before any runtime starts its thread pool:
        # XLA's CPU client keeps a second thread busy even with its Eigen pool disabled
        # (measured: 1.95 CPU-seconds per second on a matmul), so thread settings alone
        # do not give every runtime the same budget.  Pinning does.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    import jax

    from exporter import onnx_export, rebuild
    from exporter.models import registry
    from exporter.runtimes.onnxruntime import OnnxRuntime

    spec = registry.get(p["model"])
    frameworks = [f for f in p.get("frameworks", ["torch", "flax"]) if f in spec.frameworks]
    canonical = rebuild.init_state(spec, seed=0)
    out = Path(p["dir"]) / spec.name
    runners: dict[str, Callable[[dict[str, Any]], Any]] = {}
    pairs: dict[str, tuple[str, str]] = {}
    settings: dict[str, Any] = {}
    names = [t.name for t in spec.inputs]
    if "torch" in frameworks:
        module = rebuild.torch_module(spec, canonical)
        path = out / "torch" / "model.onnx"
        if not path.exists():
            onnx_export.export_model(spec, "torch", module, path)

        def torch_eager(x: dict[str, Any]) -> Any:
            with torch.inference_mode():
                r = module(*(torch.from_numpy(x[n]) for n in names))
            return [t.numpy() for t in r] if isinstance(r, (tuple, list)) else r.numpy()

        rt = OnnxRuntime(path, intra_op_threads=threads or None)
        settings["onnxruntime"] = rt.session_options()
        sess_t = rt._session  # the session with our settings; the adapter's input checks are not timed
        runners["torch eager"] = torch_eager
        runners["onnxruntime (torch export)"] = lambda x, s=sess_t: s.run(None, x)
        pairs["torch"] = ("onnxruntime (torch export)", "torch eager")
        variant_info = _p4_variants(spec, module, path, out, p.get("variants", []), threads, runners, pairs)
    if "flax" in frameworks:
        variables = rebuild.flax_variables(spec, canonical)
        path = out / "flax" / "model.onnx"
        if not path.exists():
            onnx_export.export_model(spec, "flax", variables, path)
        fmod = spec.flax_factory()
        kwargs = dict(spec.flax_apply_kwargs)
        jitted = jax.jit(lambda v, *a: fmod.apply(v, *a, **kwargs))

        def jax_jit(x: dict[str, Any]) -> Any:
            return jax.block_until_ready(jitted(variables, *(x[n] for n in names)))

        rt = OnnxRuntime(path, intra_op_threads=threads or None)
        settings["onnxruntime"] = rt.session_options()
        sess_f = rt._session
        runners["jax.jit"] = jax_jit
        runners["onnxruntime (flax export)"] = lambda x, s=sess_f: s.run(None, x)
        pairs["flax"] = ("onnxruntime (flax export)", "jax.jit")
    settings["torch_num_threads"] = torch.get_num_threads()
    settings["cpus"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    settings["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    rounds = int(p.get("rounds", 5))
    budget = float(p.get("budget", 0.1))
    result: dict[str, Any] = {"settings": settings, "pairs": pairs, "latency": {}}
    if "torch" in frameworks:
        result["variants"] = variant_info
    inputs = {b: spec.example_inputs({"batch": b}, seed=0) for b in p.get("batches", [1, 32])}
    calls = {}  # warm-up (jit compiles, first-run allocations) and block sizes
    for b, x in inputs.items():
        for k, fn in runners.items():
            calls[(b, k)] = _calibrate(lambda fn=fn, x=x: fn(x), budget)
    samples: dict[str, dict[str, list[float]]] = {str(b): {k: [] for k in runners} for b in inputs}
    for _ in range(rounds):
        for b, x in inputs.items():
            for k, fn in runners.items():
                time.sleep(0.01)
                samples[str(b)][k].append(_per_call(lambda fn=fn, x=x: fn(x), calls[(b, k)]))
    result["calls_per_block"] = {f"{b}/{k}": n for (b, k), n in calls.items()}
    result["latency"] = samples
    result["dims"] = {str(b): {**spec.dims, "batch": b} for b in inputs}
    del np
    return result


# ----------------------------------------------------------------------------- P8
@case
def p8_bare(p: dict[str, Any]) -> dict[str, Any]:
    """The dynamo exporter's floor for P8: the checkpoint (safetensors) into the registry's
    torch build of ``minilm``, then ``torch.onnx.export(dynamo=True)`` with dynamic batch and
    seq to ``p["out"]``.  No reference runs, no sweep, no bundle.  Timed by the caller as a
    whole process (imports included)."""
    import torch
    from safetensors.torch import load_file

    from exporter.models import registry

    spec = registry.get("minilm")
    module = spec.torch_factory().eval()
    loaded = module.load_state_dict(load_file(p["checkpoint"]), strict=False)  # its extra keys (pooler, ids) are ignored
    if loaded.missing_keys:
        raise SystemExit(f"{p['checkpoint']} lacks {loaded.missing_keys[:5]}: not the all-MiniLM-L6-v2 checkpoint")
    ex = spec.example_inputs({"batch": 2, "seq": 3})
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    out = Path(p["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(ex[t.name]) for t in spec.inputs),
            str(out),
            dynamo=True,
            input_names=[t.name for t in spec.inputs],
            output_names=list(spec.outputs),
            opset_version=20,
            dynamic_shapes=tuple({0: batch, 1: seq} for _ in spec.inputs),
        )
    return {"bytes": sum(f.stat().st_size for f in out.parent.iterdir())}  # model.onnx (+ its .data)


# ----------------------------------------------------------------------------- P9
@case
def peak_rss_of(p: dict[str, Any]) -> dict[str, Any]:
    """Run ``p["cmd"]`` to completion: its wall seconds and the peak RSS of the largest
    process in its tree (``RUSAGE_CHILDREN``: this process has no other children)."""
    import resource
    import subprocess

    t = time.perf_counter()
    proc = subprocess.run(list(p["cmd"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(p['cmd'])} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
    return {"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


# ----------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in CASES:
        print(f"usage: python -m benchmarks.child CASE [JSON]; cases: {', '.join(sorted(CASES))}", file=sys.stderr)
        return 2
    params = json.loads(argv[1]) if len(argv) > 1 else {}
    result = CASES[argv[0]](params)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
