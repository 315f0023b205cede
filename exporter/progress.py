"""Progress of a long run on the terminal: a bar on a TTY, plain lines otherwise.

:class:`Progress` is what the CLI hands to ``exporter.api.export(progress=...)``.  The API
reports steps as lines ``"[k/total] model (framework): stage"`` (``exporting ...``, then
``PASS (2.1 s)`` / ``FAIL ...`` / ``ERROR ...``); a log, a CI job or a pipe gets exactly
those lines, while a terminal gets one bar redrawn in place, with the current model and
stage, and the finished steps printed above it::

    [3/8] cnn (torch): PASS (2.1 s)
    [#########...............] 4/8  minilm (flax): exporting ...
"""

from __future__ import annotations

import os
import re
import shutil
import time
from typing import TextIO

__all__ = ["Progress"]

_STEP = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
_DONE = re.compile(r": (PASS|FAIL|ERROR)\b")


class Progress:
    """A ``progress(line)`` callback that draws a bar when ``stream`` is a terminal.

    Args:
        stream: where to write (stderr in the CLI).
        tty: force the bar on or off; default: ``stream.isatty()`` and ``TERM`` is not ``dumb``.
        width: bar width in characters (default: fits the terminal).
    """

    def __init__(self, stream: TextIO, *, tty: bool | None = None, width: int | None = None) -> None:
        self.stream = stream
        if tty is None:
            tty = bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM", "") != "dumb"
        self.tty = tty
        self.width = width
        self._drawn = 0  # characters of the bar line now on screen
        self._t0 = time.perf_counter()

    def __call__(self, line: str) -> None:
        m = _STEP.match(line)
        if not self.tty or m is None:
            self._clear()
            self.stream.write(line + "\n")
            self.stream.flush()
            return
        k, total, what = int(m.group(1)), int(m.group(2)), m.group(3)
        if _DONE.search(what):  # a finished step stays on screen, above the bar
            self._clear()
            self.stream.write(line + "\n")
            self._bar(k, total, "")
        else:
            self._bar(k - 1, total, what)
        self.stream.flush()

    def _bar(self, done: int, total: int, what: str) -> None:
        columns = shutil.get_terminal_size((100, 20)).columns
        width = self.width or max(10, min(30, columns // 4))
        filled = round(width * done / max(total, 1))
        elapsed = time.perf_counter() - self._t0
        text = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  {what}  {elapsed:.0f} s"
        text = text[: max(columns - 1, 20)]
        self.stream.write("\r" + text + " " * max(0, self._drawn - len(text)))
        self._drawn = len(text)

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self._drawn = 0

    def close(self) -> None:
        """Remove the bar (call when the run is over)."""
        self._clear()
        self.stream.flush()
