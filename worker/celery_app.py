"""The Celery application, shared by the sender (the listener's outbox) and the workers.

Import-light on purpose: no torch here. ``celery -A worker.celery_app worker``
works, and so does ``ctdx worker``.

Broker URLs:

- ``redis://...`` (production): visibility timeout set longer than the task's
  hard time limit, so Redis does not hand a slow study to a second worker.
- ``embedded`` (or ``filesystem://``): kombu's filesystem transport under
  ``<data_dir>/queue``; needs no server, works across processes on one machine.
- ``memory://``: in-process only (tests).

Signals (handlers import lazily; see ``worker.runtime``): logging is ours
(``db.logs``, no PHI), the main process refuses a database that is not at the
migrations' head, and each pool process loads the models once. The main
process also serves the worker's metrics (``worker.metrics``) and, once the
pool runs, reconciles from the database (``worker.reconcile``): its
heartbeat, study versions the broker lost, analyses without reports.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from celery import Celery, signals

from db.settings import Settings, load_settings

QUEUE = "ctdx"
TASK_PROCESS_STUDY = "ctdx.process_study"


def task_id_for(study_version_id: int) -> str:
    """Stable task id: a re-send of the same study version is recognisably the same job."""
    return f"study-version-{study_version_id}"


def visibility_timeout(settings: Settings) -> int:
    """Seconds Redis waits before redelivering an unacked task: well beyond the hard limit."""
    return settings.task_time_limit * 2 + 600


def broker_config(settings: Settings) -> tuple[str, dict[str, Any]]:
    """Broker URL and transport options for ``settings``."""
    url = settings.broker_url
    if url in ("embedded", "filesystem://"):
        queue_dir = (settings.data_dir / "queue").absolute()
        for sub in ("messages", "processed", "control"):
            Path(queue_dir / sub).mkdir(parents=True, exist_ok=True)
        return "filesystem://", {
            "data_folder_in": str(queue_dir / "messages"),
            "data_folder_out": str(queue_dir / "messages"),
            "processed_folder": str(queue_dir / "processed"),
            "control_folder": str(queue_dir / "control"),  # default: ./control in the cwd
            "store_processed": False,
        }
    options: dict[str, Any] = {"visibility_timeout": visibility_timeout(settings)}
    if url.startswith(("redis://", "rediss://")):
        options.update({"socket_connect_timeout": 5, "socket_timeout": 30})
    return url, options


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for long, idempotent study analyses."""
    url, transport_options = broker_config(settings)
    app = Celery("ctdx", broker=url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        task_routes={TASK_PROCESS_STUDY: {"queue": QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=max(settings.task_time_limit - 30, 5),
        worker_prefetch_multiplier=1,
        # a pool process loads the models in worker_process_init (torch import, checkpoints,
        # CUDA start-up): Celery's default of 4 s kills and respawns it in a loop
        worker_proc_alive_timeout=300,
        worker_hijack_root_logger=False,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
    )
    app.conf.ctdx_settings = settings
    return app


app = make_celery(load_settings())


def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Our handlers and format for ``celery -A worker.celery_app worker`` too."""
    from db.logs import configure_logging

    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else (loglevel or "INFO")
    configure_logging(str(level).upper())


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Main process, before the pool starts: check the database, remember the concurrency,
    serve the metrics (the pool processes inherit the metrics directory)."""
    from worker import metrics, runtime

    settings: Settings = app.conf.ctdx_settings
    runtime.on_worker_init(settings, concurrency=getattr(sender, "concurrency", None))
    metrics.start(settings)


def _on_worker_process_init(**_: Any) -> None:
    """Each pool process (prefork child, or the solo worker): load the models once."""
    from worker import metrics, runtime
    from worker.errors import WorkerNotReady

    settings: Settings = app.conf.ctdx_settings
    runtime.on_process_init(settings)
    try:
        metrics.observe_model(runtime.get_models(settings))
    except WorkerNotReady:
        pass  # logged by on_process_init; the first task tries again


def _on_worker_process_shutdown(pid: int | None = None, **_: Any) -> None:
    from db.metrics import process_exited

    process_exited(pid or os.getpid())


_reconciler: list[Any] = []  # (WorkerReconciler, its thread) of this main process


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Main process, pool running: reconcile from the database (``worker.reconcile``)."""
    from worker.reconcile import WorkerReconciler

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
