"""Prometheus plumbing shared by the listener and the workers (``prometheus-client``).

Both services run several processes (listener processes sharing the port,
Celery pool processes), so metrics use the library's multiprocess mode: every
process writes its values to memory-mapped files in one directory per
service instance, and the HTTP endpoint of the main process adds them up.
:func:`prepare` must run in the main process before any metric is created and
before children start (they inherit ``PROMETHEUS_MULTIPROC_DIR``); metric
objects are therefore created lazily (:func:`ctdx.scp.metrics.listener_metrics`,
:func:`ctdx.worker.metrics.worker_metrics`), never at import.

The directory is ``$PROMETHEUS_MULTIPROC_DIR/ctdx-metrics-<service>-<pid>`` (the system's
temporary directory when the variable is unset): the service's own, emptied
when it starts and removed when it stops; directories of dead services are
removed at the next start.

Values read from the database (outbox depth, exports by state) are collected
at scrape time by :class:`DatabaseCollector`: they are the same from every
process that serves them, so aggregate them with ``max``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

logger = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
_BASE_ENV = "CTDX_METRICS_BASE_DIR"  # where the per-service directories go (set by prepare)

__all__ = ["DatabaseCollector", "prepare", "serve"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare(service: str) -> Path:
    """Switch this process (and the children it starts) to multiprocess metrics.

    Idempotent within a process tree: a child that inherited the directory keeps it.
    """
    current = os.environ.get(ENV)
    prefix = f"ctdx-metrics-{service}-"
    if current and os.environ.get(_BASE_ENV) and Path(current).name.startswith(prefix):
        return Path(current)  # inherited from our own main process
    base = Path(current) if current else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    for old in base.glob(f"{prefix}*"):
        pid_text = old.name[len(prefix):]
        if old.is_dir() and pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"{prefix}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[ENV] = str(path)
    os.environ[_BASE_ENV] = str(base)
    from prometheus_client import values

    # in case the library was imported before this process chose multiprocess mode
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    owner = os.getpid()

    def _remove() -> None:
        if os.getpid() == owner:  # forked children inherit atexit handlers
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(_remove)
    return path


def process_exited(pid: int) -> None:
    """Forget the live gauges of a child process that ended (Celery pool, listener process)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def serve(port: int, collectors: Iterable[Any] = (), host: str = "") -> Any | None:
    """Serve ``/metrics`` on ``port`` from a daemon thread; ``None`` when it cannot listen.

    A port in use (a second worker on the same host) is a warning, not a failure:
    the service runs without its metrics endpoint.
    """
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(ENV):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    for collector in collectors:
        registry.register(collector)
    try:
        server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=registry)
    except OSError as exc:
        logger.warning("metrics endpoint not started on port %d: %s (set the port to 0 to "
                       "turn it off, or to a free port)", port, exc)
        return None
    logger.info("Prometheus metrics on port %d (/metrics)", port)
    return server


class DatabaseCollector:
    """Gauges read from the results database at scrape time; ``ctdx_database_up`` 0 when down.

    ``families`` are functions of a connection-owning engine returning metric
    families (``prometheus_client.core.GaugeMetricFamily`` and friends).
    """

    def __init__(self, engine: Engine, families: Callable[[Engine], Iterable[Any]]) -> None:
        self.engine = engine
        self.families = families

    def describe(self) -> list[Any]:
        return []  # no fixed description: never query the database at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("ctdx_database_up", "1 when the results database answered.")
        try:
            found = list(self.families(self.engine))
        except SQLAlchemyError as exc:
            logger.warning("metrics: database not readable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from found
