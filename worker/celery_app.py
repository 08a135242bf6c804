"""The workers' Celery application: the queue's configuration (``ctdx.db.broker``, which the
listener's outbox uses to send) plus the workers' task and signal handlers.

Import-light on purpose: no torch here. ``celery -A ctdx.worker.celery_app worker``
works, and so does ``ctdx worker``. Broker URLs are described in ``ctdx.db.broker``.

Signals (handlers import lazily; see ``ctdx.worker.runtime``): logging is ours
(``ctdx.db.logs``, no PHI), the main process refuses a database that is not at the
migrations' head, and each pool process loads the models once. The main
process also serves the worker's metrics (``ctdx.worker.metrics``) and, once the
pool runs, reconciles from the database (``ctdx.worker.reconcile``): its
heartbeat, study versions the broker lost, analyses without reports.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from ctdx.db.broker import QUEUE
from ctdx.db.broker import make_celery as _make_celery
from ctdx.db.settings import Settings, load_settings

__all__ = ["app", "make_celery"]


def make_celery(settings: Settings) -> Celery:
    """The workers' Celery app: the queue's configuration (``ctdx.db.broker``) and our tasks."""
    return _make_celery(settings, include=("ctdx.worker.tasks",))


app = make_celery(load_settings())


def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Our handlers and format for ``celery -A worker.celery_app worker`` too."""
    from ctdx.db.logs import configure_logging

    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else (loglevel or "INFO")
    configure_logging(str(level).upper())


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Main process, before the pool starts: check the database, remember the concurrency,
    serve the metrics (the pool processes inherit the metrics directory)."""
    from ctdx.worker import metrics, runtime

    settings: Settings = app.conf.ctdx_settings
    runtime.on_worker_init(settings, concurrency=getattr(sender, "concurrency", None))
    metrics.start(settings)


def _on_worker_process_init(**_: Any) -> None:
    """Each pool process (prefork child, or the solo worker): load the models once."""
    from ctdx.worker import metrics, runtime
    from ctdx.worker.errors import WorkerNotReady

    settings: Settings = app.conf.ctdx_settings
    runtime.on_process_init(settings)
    try:
        metrics.observe_model(runtime.get_models(settings))
    except WorkerNotReady:
        pass  # logged by on_process_init; the first task tries again


def _on_worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
    from ctdx.db.metrics import process_exited

    process_exited(pid or os.getpid())


_reconciler: list[Any] = []  # (WorkerReconciler, its thread) of this main process


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Main process, pool running: reconcile from the database (``ctdx.worker.reconcile``)."""
    from ctdx.worker.reconcile import WorkerReconciler

    settings: Settings = app.conf.ctdx_settings
    consumed = list(getattr(getattr(sender, "app", app).amqp.queues, "consume_from", None) or [])
    queue = consumed[0] if consumed else QUEUE
    reconciler = WorkerReconciler(settings, queue, detail={"queues": consumed or [QUEUE]})
    _reconciler[:] = [reconciler, reconciler.start()]


def _on_worker_shutdown(**_: Any) -> None:
    if _reconciler:
        reconciler, thread = _reconciler
        thread.stop()
        reconciler.close()
        _reconciler.clear()


signals.setup_logging.connect(_setup_logging, weak=False)
signals.worker_init.connect(_on_worker_init, weak=False)
signals.worker_process_init.connect(_on_worker_process_init, weak=False)
signals.worker_process_shutdown.connect(_on_worker_process_shutdown, weak=False)
signals.worker_ready.connect(_on_worker_ready, weak=False)
signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
