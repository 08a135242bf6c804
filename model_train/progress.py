"""Progress of the long commands: Rich bars on a terminal (cache, training), plain lines at
least every few seconds for any output (the demonstration model); entry points opt in."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class ProgressBar:
    """A Rich progress bar on stderr (only for interactive commands)."""

    def __init__(self, total: int, description: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def close(self) -> None:
        self._progress.stop()


class ProgressLines:
    """Plain progress lines for a long job, whether or not the output is a terminal.

    One line when a step starts, then one at least every ``interval`` seconds from a
    heartbeat thread (``elapsed, step, done/total``), so a log or a pipe shows that
    the job is alive even inside a step that reports nothing (a slow first batch,
    int8 calibration). ``write`` gets each line without a newline.
    """

    def __init__(self, write: Callable[[str], None], interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._write = write
        self._interval = interval
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._step = ""
        self._done = 0
        self._total: int | None = None
        self._unit = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProgressLines:
        self._thread = threading.Thread(target=self._beat, name="progress-lines", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def step(self, name: str, total: int | None = None, unit: str = "") -> None:
        """Start a step (``total`` units of work, or None when unknown) and say so."""
        with self._lock:
            self._step, self._done, self._total, self._unit = name, 0, total, unit
            line = self._line()
        self._write(line)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self._done += n

    def _line(self) -> str:
        elapsed = self._clock() - self._start
        count = ""
        if self._total:
            count = f": {self._done}/{self._total}{' ' + self._unit if self._unit else ''}"
        return f"[{elapsed:4.0f} s] {self._step}{count}"

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                line = self._line() if self._step else ""
            if line:
                self._write(line)
