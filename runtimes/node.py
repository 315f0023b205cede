"""The ``node`` runtime: an ONNX model in onnxruntime-node, driven from Python.

This is the "consumer in another language" check: the bundle's ``model.onnx`` runs in
Node.js through ``onnxruntime-node`` (the package a JavaScript service would use), and
Python compares its raw outputs with the same :func:`exporter.parity.compare` as every
other runtime, so tolerances and exit codes are identical.

How it works: :class:`NodeRuntime` starts ``node runtimes/js/run_bundle.js serve
MODEL`` once (the session is created once), then for each :meth:`~exporter.runtimes.base.Runtime.run`
writes the inputs as ONNX ``TensorProto`` files (``input_<i>.pb``, as in a bundle's
``test_data_set_<k>``), sends one JSON line on the child's stdin, and reads back
``output_<i>.pb`` files.  The JS program decodes TensorProto itself (onnxruntime-node has
no parser for it; see ``runtimes/js/tensorproto.js``).

The same program verifies a bundle on its own, without Python (see :func:`node_verify`
and ``node runtimes/js/run_bundle.js verify BUNDLE``).

Requirements: Node.js >= 18 on ``PATH`` (or ``EXPORTER_NODE=/path/to/node``), and the npm
package installed beside the program::

    cd runtimes/js && npm ci --ignore-scripts

(``--ignore-scripts``: onnxruntime-node's postinstall downloads GPU binaries and fails
offline; the CPU binaries ship inside the package.)  ``EXPORTER_NODE_MODULES`` may point
to another ``node_modules`` directory holding ``onnxruntime-node``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from exporter.errors import MissingDependencyError, RunError, UsageError
from exporter.runtimes.base import Runtime, check_threads, onnx_io, onnx_path
from exporter.testdata import read_tensors, write_tensors

__all__ = [
    "NodeRuntime",
    "NODE_DIR",
    "SCRIPT",
    "PACKAGE",
    "PACKAGE_VERSION",
    "INSTALL_HINT",
    "find_node",
    "find_package",
    "check_available",
    "node_verify",
]

NODE_DIR = Path(__file__).resolve().parent / "js"
SCRIPT = NODE_DIR / "run_bundle.js"
PACKAGE = "onnxruntime-node"
PACKAGE_VERSION = "1.30.0"
INSTALL_HINT = (
    f"cd {NODE_DIR} && npm ci --ignore-scripts "
    f"(or: npm install --ignore-scripts {PACKAGE}@{PACKAGE_VERSION})"
)
NODE_HINT = (
    "install Node.js >= 18 (e.g. `apt-get install nodejs`, or from https://nodejs.org) so that `node` "
    "is on PATH, or set EXPORTER_NODE=/path/to/node"
)
DEFAULT_TIMEOUT = 600.0
_STARTUP_TIMEOUT = 120.0


def find_node() -> str:
    """The ``node`` executable: ``$EXPORTER_NODE`` or the first ``node`` on ``PATH``.

    Raises:
        MissingDependencyError: Node.js is not installed (says how to install it).
    """
    explicit = os.environ.get("EXPORTER_NODE")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise MissingDependencyError(f"EXPORTER_NODE={explicit!r} is not an executable file; {NODE_HINT}")
    found = shutil.which("node")
    if not found:
        raise MissingDependencyError(f"runtime 'node' needs Node.js, but `node` is not on PATH; {NODE_HINT}")
    return found


def _module_dirs() -> list[Path]:
    dirs = [NODE_DIR / "node_modules"]
    extra = os.environ.get("EXPORTER_NODE_MODULES")
    if extra:
        dirs.insert(0, Path(extra))
    return dirs


def find_npm_package(name: str, *, runtime: str, version: str, install: str) -> tuple[Path, str]:
    """Where the npm package ``name`` is installed (``runtimes/js/node_modules``, or
    ``$EXPORTER_NODE_MODULES`` first) and its version; shared by the node and browser runtimes.

    Raises:
        MissingDependencyError: not installed; names ``runtime``, the wanted ``version`` and the ``install`` command.
    """
    for d in _module_dirs():
        manifest = d / name / "package.json"
        if manifest.is_file():
            try:
                found = str(json.loads(manifest.read_text(encoding="utf-8")).get("version", "?"))
            except (OSError, ValueError):
                found = "?"
            return manifest.parent, found
    looked = ", ".join(str(d) for d in _module_dirs())
    raise MissingDependencyError(
        f"runtime {runtime!r} needs the npm package {name} {version}, which is not installed (looked in {looked}); "
        f"install it with: {install}"
    )


def find_package() -> tuple[Path, str]:
    """Where ``onnxruntime-node`` is installed and its version.

    Returns:
        ``(package directory, version)``.

    Raises:
        MissingDependencyError: the npm package is not installed (gives the npm command).
    """
    return find_npm_package(PACKAGE, runtime="node", version=PACKAGE_VERSION, install=INSTALL_HINT)


def check_available() -> dict[str, str]:
    """Check that the node runtime can run; return what it will use.

    Returns:
        ``{"node": path, "package_dir": path, "onnxruntime-node": version}``.

    Raises:
        MissingDependencyError: Node.js or onnxruntime-node is missing.
    """
    node = find_node()
    pkg, version = find_package()
    assert SCRIPT.is_file(), f"{SCRIPT} is missing from this copy of exporter"
    return {"node": node, "package_dir": str(pkg), "onnxruntime-node": version}


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    extra = os.environ.get("EXPORTER_NODE_MODULES")
    if extra:
        env["NODE_PATH"] = os.pathsep.join(p for p in (extra, env.get("NODE_PATH", "")) if p)
    return env


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    return text[-limit:]


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for text in stream:
        lines.put(text)
    lines.put(None)


def _shutdown(proc: subprocess.Popen[str] | None, tmp: str) -> None:
    # Module-level (not a method) so weakref.finalize holds no reference to the runtime.
    if proc is not None and proc.poll() is None:
        try:
            if proc.stdin:
                proc.stdin.close()  # serve ends at EOF on stdin
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)


class NodeRuntime(Runtime):
    """An ``.onnx`` file in onnxruntime-node (CPU), run by a long-lived ``node`` child process.

    Args:
        path: the ``.onnx`` file (external data is read from beside it).
        intra_op_threads: threads per operator (``None``: onnxruntime's default); the
            keyword matches :class:`exporter.runtimes.onnxruntime.OnnxRuntime`.
        timeout: seconds to wait for one run before the child is killed.

    Raises:
        MissingDependencyError: Node.js or the npm package onnxruntime-node is missing.
        UsageError: missing file, bad arguments, or inputs that are not numeric tensors.
        RunError: a model that onnx or onnxruntime-node cannot load; a run that node fails
            (its error, a crash, a timeout) raises it too.
    """

    name: ClassVar[str] = "node"
    artifact_kind: ClassVar[str] = "onnx"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        intra_op_threads: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        import onnx

        self.path = onnx_path(path, self.name)
        self.source = self.path
        self.intra_op_threads = check_threads(self.name, intra_op_threads)
        self.timeout = float(timeout)
        self.available = check_available()
        try:
            model = onnx.load(self.path, load_external_data=False)
        except Exception as e:  # protobuf DecodeError and friends
            raise RunError(f"runtime 'node': {self.path!r} is not a readable ONNX model ({e}); re-export it") from e
        self.inputs, self.outputs = onnx_io(model, self.path)
        del model
        self._tmp = tempfile.mkdtemp(prefix="exporter-node-")
        self._stderr_path = Path(self._tmp) / "stderr.txt"
        self._requests = 0
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._proc: subprocess.Popen[str] | None = None
        self._finalizer = weakref.finalize(self, _shutdown, None, self._tmp)
        self._start()

    # -- child process --------------------------------------------------------------
    def _start(self) -> None:
        cmd = [self.available["node"], str(SCRIPT), "serve", os.path.abspath(self.path)]
        if self.intra_op_threads:
            cmd += ["--threads", str(self.intra_op_threads)]
        with open(self._stderr_path, "w", encoding="utf-8") as err:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                encoding="utf-8",
                cwd=str(NODE_DIR),
                env=_node_env(),
            )
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._tmp)
        # The reader thread gets only the pipe and the queue, never self, so an unclosed
        # runtime can still be garbage-collected (its finalizer then stops the child).
        threading.Thread(target=_pump, args=(self._proc.stdout, self._lines), daemon=True).start()
        hello = self._reply(_STARTUP_TIMEOUT, "start")
        if not hello.get("ready"):
            raise RunError(f"{self.describe()}: node did not start: {hello}")
        self.runtime_versions = hello.get("runtime", {})

    def _reply(self, timeout: float, what: str) -> dict[str, Any]:
        """The child's next JSON line; RunError when it times out, exits (e.g. it cannot load
        the model at start) or writes something else."""
        try:
            text = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise RunError(
                f"{self.describe()}: node gave no answer to {what} within {timeout:g} s and was stopped; "
                "pass a larger timeout= for big models or inputs"
            ) from None
        if text is None:
            code = self._proc.wait() if self._proc is not None else None
            stderr = " ".join(_tail(self._stderr_path).split())
            self.close()
            raise RunError(f"{self.describe()}: node exited (code {code}) during {what}: {stderr or '(no message)'}")
        try:
            return dict(json.loads(text))
        except (ValueError, TypeError) as e:
            raise RunError(f"{self.describe()}: node wrote something that is not a JSON line during {what}: {text[:200]!r}") from e

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._proc is None or self._proc.poll() is not None:
            raise UsageError(f"{self.describe()}: the node process is not running (closed or crashed); create a new runtime")
        self._requests += 1
        req_dir = Path(self._tmp) / f"run_{self._requests}"
        try:
            write_tensors(req_dir / "in", "input", {s.name: inputs[s.name] for s in self.inputs})
            request = {"id": self._requests, "inputs": str(req_dir / "in"), "outputs": str(req_dir / "out")}
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
            except OSError as e:
                raise RunError(f"{self.describe()}: cannot talk to node ({e}): {' '.join(_tail(self._stderr_path).split())}") from e
            reply = self._reply(self.timeout, f"run {self._requests}")
            assert reply.get("id") == self._requests, (reply, self._requests)
            if not reply.get("ok"):
                text = " ".join(str(reply.get("error")).split())
                raise RunError(f"{self.describe()}: failed to run: onnxruntime-node: {text}")
            return read_tensors(req_dir / "out", "output")
        finally:
            shutil.rmtree(req_dir, ignore_errors=True)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        self._finalizer.detach()
        _shutdown(proc, self._tmp)


def node_verify(
    bundle: str | os.PathLike[str],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    dump: str | os.PathLike[str] | None = None,
    intra_op_threads: int | None = None,
    check_hashes: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[int, dict[str, Any]]:
    """Run the JS program's own ``verify`` on a bundle (Node does the comparison).

    This is what a Node-only CI job runs (``node runtimes/js/run_bundle.js verify
    BUNDLE``); ``exporter verify BUNDLE --runtime node`` instead uses :class:`NodeRuntime`
    and compares in Python.  Both apply the same rules and tolerances.

    Args:
        bundle: the bundle directory.
        atol, rtol: override the manifest's tolerances.
        dump: also write Node's raw outputs as ``dump/test_data_set_<k>/output_<i>.pb``.
        intra_op_threads: threads per operator.
        check_hashes: compare model file hashes with the manifest.
        timeout: seconds before the child is killed.

    Returns:
        ``(exit code, report)``: 0 pass / 1 fail / 2 bad input; the report has the schema
        of ``parity.json`` (``ParityReport.from_dict`` reads it) or ``{"ok": false,
        "error": ...}`` for exit code 2.

    Raises:
        MissingDependencyError: Node.js or onnxruntime-node is missing.
        RunError: node produced no JSON report (timeout or crash).
    """
    available = check_available()
    cmd = [available["node"], str(SCRIPT), "verify", os.path.abspath(bundle)]
    if atol is not None:
        cmd += ["--atol", repr(float(atol))]
    if rtol is not None:
        cmd += ["--rtol", repr(float(rtol))]
    if dump is not None:
        cmd += ["--dump", os.path.abspath(dump)]
    if intra_op_threads:
        cmd += ["--threads", str(int(intra_op_threads))]
    if not check_hashes:
        cmd.append("--no-hashes")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, encoding="utf-8", cwd=str(NODE_DIR), env=_node_env(), timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise RunError(f"node verify of {bundle} did not finish within {timeout:g} s; pass a larger timeout=") from e
    try:
        report = json.loads(proc.stdout)
    except ValueError as e:
        raise RunError(
            f"node verify of {bundle} exited with code {proc.returncode} without a JSON report: "
            f"{(proc.stderr or proc.stdout).strip()[-2000:] or '(no output)'}"
        ) from e
    if proc.returncode == 2 and "error" in report and proc.stderr:
        report.setdefault("stderr", proc.stderr.strip()[-2000:])
    return proc.returncode, report
