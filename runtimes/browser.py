"""The ``browser`` runtime: an ONNX model in onnxruntime-web (WASM backend) inside headless Chromium.

What transformers.js users and in-browser demos run: the bundle's ``model.onnx`` is
loaded by onnxruntime-web in a real Chromium page, every case runs in that page, and the
outputs come back to Python, where :func:`exporter.parity.compare` judges them like every
other runtime's.

How it works (all on this machine, offline):

* a local HTTP server (Python's ``http.server`` in a thread, bound to 127.0.0.1 on a free
  port) serves the page (``runtimes/js/browser/``), the shared TensorProto codec
  (``runtimes/js/tensorproto.js``, the same file the Node program uses), the onnxruntime-web
  files from ``runtimes/js/node_modules``, the model (and its external data), and each
  run's ``input_<i>.pb`` files.  Only those files: no directory listings, GET only;
* ``node runtimes/js/browser/driver.js serve`` starts the system's Chromium through
  playwright-core (a fresh profile per launch; playwright never downloads a browser
  here) and aborts every request to another origin;
* per case, Python writes the inputs as TensorProto files, the page fetches and decodes
  them, runs the session, and returns each output as a TensorProto (base64) that Python
  reads with onnx.

Requirements: Node.js >= 20, ``cd runtimes/js && npm ci --ignore-scripts`` (onnxruntime-web
1.30.0, playwright-core), and Chromium (Debian: ``apt-get install -y chromium``; or
``EXPORTER_CHROMIUM=/path/to/chrome``).  A missing piece is a ``MissingDependencyError``
with the command that installs it.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from exporter.errors import MissingDependencyError, RunError, UsageError
from exporter.runtimes.base import Runtime, check_threads, onnx_io, onnx_path

__all__ = [
    "BrowserRuntime",
    "JS_DIR",
    "DRIVER",
    "PACKAGES",
    "CHROMIUM_INSTALL",
    "find_chromium",
    "check_available",
    "snapshot",
]

JS_DIR = Path(__file__).resolve().parent / "js"
PAGE_DIR = JS_DIR / "browser"
DRIVER = PAGE_DIR / "driver.js"
TENSORPROTO_JS = JS_DIR / "tensorproto.js"
#: npm packages the browser runtime needs, with the versions package.json pins.
PACKAGES: Mapping[str, str] = {"onnxruntime-web": "1.30.0", "playwright-core": "1.65.1"}
NPM_INSTALL = f"cd {JS_DIR} && npm ci --ignore-scripts"
CHROMIUM_INSTALL = "apt-get install -y chromium"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEFAULT_TIMEOUT = 600.0
_STARTUP_TIMEOUT = 120.0

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",
    ".json": "application/json",
}


# --------------------------------------------------------------------------- what it needs
def find_chromium() -> str:
    """The Chromium executable: ``$EXPORTER_CHROMIUM``, ``/usr/bin/chromium``, or one on ``PATH``.

    Raises:
        MissingDependencyError: no Chromium (names the install command).
    """
    explicit = os.environ.get("EXPORTER_CHROMIUM")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise MissingDependencyError(
            f"EXPORTER_CHROMIUM={explicit!r} is not an executable file; point it at chromium or google-chrome, "
            f"or install Chromium with: {CHROMIUM_INSTALL}"
        )
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise MissingDependencyError(
        f"runtime 'browser' needs Chromium, but none was found ({', '.join(CHROMIUM_CANDIDATES)} on PATH); "
        f"install it with: {CHROMIUM_INSTALL} (Debian/Ubuntu), or set EXPORTER_CHROMIUM=/path/to/chromium"
    )


def _find_package(name: str) -> tuple[Path, str]:
    from exporter.runtimes.node import find_npm_package

    return find_npm_package(name, runtime="browser", version=PACKAGES[name], install=NPM_INSTALL)


def check_available() -> dict[str, str]:
    """Check that the browser runtime can run; return what it will use.

    Returns:
        ``{"node": path, "chromium": path, "ort_dist": path, "onnxruntime-web": version,
        "playwright-core": version}``.

    Raises:
        MissingDependencyError: Node.js, an npm package or Chromium is missing.
    """
    from exporter.runtimes.node import find_node

    found = {"node": find_node()}
    ort_dir, found["onnxruntime-web"] = _find_package("onnxruntime-web")
    _, found["playwright-core"] = _find_package("playwright-core")
    found["ort_dist"] = str(ort_dir / "dist")
    found["chromium"] = find_chromium()
    assert DRIVER.is_file() and TENSORPROTO_JS.is_file(), f"{PAGE_DIR} is incomplete in this copy of exporter"
    return found


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    extra = os.environ.get("EXPORTER_NODE_MODULES")
    if extra:
        env["NODE_PATH"] = os.pathsep.join(p for p in (extra, env.get("NODE_PATH", "")) if p)
    return env


# --------------------------------------------------------------------------- the local server
class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD of exactly the files in ``routes``: URL prefix -> (directory, allowed names or None)."""

    routes: Mapping[str, tuple[Path, frozenset[str] | None]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def _resolve(self) -> Path | None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        for prefix, (root, allowed) in self.routes.items():
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) :]
            if allowed is not None and rel not in allowed:
                return None
            target = (root / rel).resolve()
            if target.is_file() and target.is_relative_to(root.resolve()):
                return target
            return None
        return None

    def _serve(self, *, body: bool) -> None:
        target = self._resolve()
        if target is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        data = target.read_bytes()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", _CONTENT_TYPES.get(target.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        # Cross-origin isolation: lets onnxruntime-web use WASM threads (SharedArrayBuffer).
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep the test output clean
        pass


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 (free port) in a daemon thread."""

    def __init__(self, routes: Mapping[str, tuple[Path, frozenset[str] | None]]) -> None:
        handler = type("Handler", (_Handler,), {"routes": dict(routes)})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, name="exporter-browser-http", daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- the driver process
def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for text in stream:
        lines.put(text)
    lines.put(None)


def _shutdown(proc: subprocess.Popen[str] | None, server: _Server | None, tmp: str) -> None:
    # Module-level (not a method) so weakref.finalize holds no reference to the runtime.
    if proc is not None and proc.poll() is None:
        try:
            if proc.stdin:
                proc.stdin.close()  # serve closes Chromium and exits at EOF on stdin
            proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
    if server is not None:
        server.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()[-limit:]
    except OSError:
        return ""


def _external_data_files(model: Any) -> list[str]:
    """Locations of the model's external-data files (relative to the model's directory)."""
    import onnx

    files = set()
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                files.update(e.value for e in t.external_data if e.key == "location")
        graphs += [a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
        graphs += [sg for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPHS for sg in a.graphs]
    return sorted(files)


class BrowserRuntime(Runtime):
    """An ``.onnx`` file in onnxruntime-web (WASM) in headless Chromium, driven from Python.

    Args:
        path: the ``.onnx`` file (external data is served from beside it).
        intra_op_threads: WASM threads (default 1; more use SharedArrayBuffer, which the
            local server enables through cross-origin isolation).
        timeout: seconds to wait for one run before the browser is stopped.

    Raises:
        MissingDependencyError: Node.js, the npm packages or Chromium are missing.
        UsageError: missing file, bad arguments, inputs that are not numeric tensors.
        RunError: the page or onnxruntime-web cannot load the model, or fails a run.
    """

    name: ClassVar[str] = "browser"
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
        self.threads = check_threads(self.name, intra_op_threads, "default 1") or 1
        self.timeout = float(timeout)
        self.available = check_available()
        try:
            model = onnx.load(self.path, load_external_data=False)
        except Exception as e:  # protobuf DecodeError and friends: untrusted bytes
            raise RunError(f"runtime 'browser': {self.path!r} is not a readable ONNX model ({e}); re-export it") from e
        self.inputs, self.outputs = onnx_io(model, self.path)
        external = _external_data_files(model)
        del model
        self.console_errors: list[str] = []
        self.versions: dict[str, Any] = {}
        self.wasm: dict[str, Any] = {}
        self._tmp = tempfile.mkdtemp(prefix="exporter-browser-")
        self._runs = Path(self._tmp) / "runs"
        self._runs.mkdir()
        self._stderr_path = Path(self._tmp) / "stderr.txt"
        self._requests = 0
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._proc: subprocess.Popen[str] | None = None
        model_file = Path(self.path).resolve()
        self._server: _Server | None = _Server(
            {
                "/page/": (PAGE_DIR, frozenset({"index.html", "runner.js"})),
                "/lib/": (JS_DIR, frozenset({TENSORPROTO_JS.name})),
                "/ort/": (Path(self.available["ort_dist"]), None),
                "/model/": (model_file.parent, frozenset({model_file.name, *external})),
                "/run/": (self._runs, None),
            }
        )
        self._finalizer = weakref.finalize(self, _shutdown, None, self._server, self._tmp)
        cmd = [
            self.available["node"], str(DRIVER), "serve",
            "--base", self._server.base,
            "--model", f"/model/{model_file.name}",
            "--chromium", self.available["chromium"],
            "--threads", str(self.threads),
        ]  # fmt: skip
        for f in external:
            cmd += ["--external-data", f]
        with open(self._stderr_path, "w", encoding="utf-8") as err:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, encoding="utf-8",
                cwd=str(JS_DIR), env=_node_env(),
            )  # fmt: skip
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._server, self._tmp)
        # The reader thread gets only the pipe and the queue, never self, so an unclosed
        # runtime can still be garbage-collected (its finalizer then stops the browser).
        threading.Thread(target=_pump, args=(self._proc.stdout, self._lines), daemon=True).start()
        hello = self._reply(_STARTUP_TIMEOUT, "start")
        if not hello.get("ready"):
            self.close()
            raise RunError(
                f"{self.describe()}: cannot load the model in onnxruntime-web: {hello.get('error')}"
                + "".join(f"; console: {m}" for m in hello.get("console_errors", [])[:3])
            )
        assert list(hello["outputs"]) == list(self.outputs), (hello["outputs"], self.outputs)
        self.versions = dict(hello.get("versions", {}))
        self.wasm = dict(hello.get("wasm", {}))

    def _reply(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            text = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise RunError(
                f"{self.describe()}: the browser gave no answer to {what} within {timeout:g} s and was stopped; "
                "pass a larger timeout= for big models or inputs"
            ) from None
        if text is None:
            code = self._proc.wait() if self._proc is not None else None
            stderr = _tail(self._stderr_path)
            self.close()
            raise RunError(f"{self.describe()}: the browser driver exited (code {code}) during {what}: {stderr or '(no message)'}")
        try:
            reply = dict(json.loads(text))
        except (ValueError, TypeError) as e:
            raise RunError(f"{self.describe()}: the driver wrote something that is not a JSON line during {what}: {text[:200]!r}") from e
        self.console_errors += list(reply.get("console_errors", []))
        blocked = reply.get("blocked") or []
        # The page must need nothing but the local server: a blocked request is our bug.
        assert not blocked, f"the browser page tried to reach {blocked}"
        return reply

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from onnx import TensorProto, numpy_helper

        from exporter.testdata import write_tensors

        if self._proc is None or self._proc.poll() is not None:
            raise RunError(f"{self.describe()}: the browser is not running (closed or crashed); create a new runtime")
        self._requests += 1
        run_dir = self._runs / str(self._requests)
        try:
            write_tensors(run_dir, "input", {s.name: inputs[s.name] for s in self.inputs})
            urls = [f"/run/{self._requests}/input_{i}.pb" for i in range(len(self.inputs))]
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(json.dumps({"id": self._requests, "inputs": urls}) + "\n")
                self._proc.stdin.flush()
            except OSError as e:
                raise RunError(f"{self.describe()}: cannot talk to the browser driver ({e}): {_tail(self._stderr_path)}") from e
            reply = self._reply(self.timeout, f"run {self._requests}")
            assert reply.get("id") == self._requests, (reply.get("id"), self._requests)
            if not reply.get("ok"):
                raise RunError(f"{self.describe()}: failed to run: onnxruntime-web: {reply.get('error')}")
            out: dict[str, np.ndarray] = {}
            for item in reply["outputs"]:
                t = TensorProto.FromString(base64.b64decode(item["b64"]))
                out[item["name"]] = numpy_helper.to_array(t)
            return out
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def server_base(self) -> str:
        """The local server's URL (``http://127.0.0.1:PORT/``) while the runtime is open."""
        assert self._server is not None, "the runtime is closed"
        return self._server.base

    def session_options(self) -> dict[str, Any]:
        """The page's settings, JSON-serialisable: backend, WASM threads/SIMD, versions."""
        return {
            "backend": "wasm",
            "execution_providers": ["wasm"],
            "graph_optimization_level": "all",
            "threads": self.wasm.get("threads", self.threads),
            "simd": self.wasm.get("simd"),
            "cross_origin_isolated": self.wasm.get("cross_origin_isolated"),
            "versions": dict(self.versions),
        }

    def close(self) -> None:
        proc, self._proc = self._proc, None
        server, self._server = self._server, None
        self._finalizer.detach()
        _shutdown(proc, server, self._tmp)


# --------------------------------------------------------------------------- pages
def snapshot(
    page: str | os.PathLike[str],
    screenshot: str | os.PathLike[str],
    *,
    width: int = 1280,
    height: int = 900,
    selectors: Sequence[str] = ("svg",),
    full_page: bool = True,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Open a local HTML file in headless Chromium, save a full-page PNG, and say what rendered.

    Only ``file:`` and ``data:`` URLs load: any other request is aborted and listed, so a
    page that needs the network shows it.

    Args:
        page: the ``.html`` file.
        screenshot: where to write the PNG.
        width, height: the viewport.
        selectors: CSS selectors to count.
        full_page: the whole page (True) or only the viewport.
        timeout: seconds before the browser is stopped.

    Returns:
        ``{"counts": {selector: n}, "svg": [{"id", "children", "width", "height"}],
        "text": the page's visible text, "console_errors": [...], "blocked": [...]}``.

    Raises:
        MissingDependencyError: Node.js, playwright-core or Chromium is missing.
        UsageError: ``page`` is not a file.
        RunError: the browser failed to open the page.
    """
    from exporter.runtimes.node import find_node

    p = Path(page).resolve()
    if not p.is_file():
        raise UsageError(f"{str(p)!r} is not a file; pass the path of an .html page")
    node = find_node()
    _find_package("playwright-core")
    chromium = find_chromium()
    cmd = [
        node, str(DRIVER), "snapshot", "--url", p.as_uri(), "--chromium", chromium,
        "--screenshot", str(Path(screenshot).resolve()), "--width", str(int(width)), "--height", str(int(height)),
    ]  # fmt: skip
    for s in selectors:
        cmd += ["--selector", s]
    if not full_page:
        cmd.append("--viewport-only")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", cwd=str(JS_DIR), env=_node_env(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RunError(f"the browser did not render {p} within {timeout:g} s") from e
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        result = dict(json.loads(lines[-1]))
    except (IndexError, ValueError) as e:
        raise RunError(f"the browser driver exited with code {proc.returncode} without a JSON result: {proc.stderr.strip()[-2000:]}") from e
    if not result.get("ok"):
        raise RunError(f"the browser could not render {p}: {result.get('error')}: {proc.stderr.strip()[-1000:]}")
    result.pop("ok")
    return result

