"""The queue between the listener and the workers: its name, its task, its broker.

The contract both sides share (the listener's outbox and the reconciliation send, the workers
consume), so it lives in the foundation; the Celery application with the workers' signal
handlers is ``ctdx.worker.celery_app``.

Broker URLs:

- ``redis://...`` (production): visibility timeout set longer than the task's
  hard time limit, so Redis does not hand a slow study to a second worker.
- ``embedded`` (or ``filesystem://``): kombu's filesystem transport under
  ``<data_dir>/queue``; needs no server, works across processes on one machine.
- ``memory://``: in-process only (tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from ctdx.db.settings import Settings

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


def make_celery(settings: Settings, include: tuple[str, ...] = ()) -> Celery:
    """A Celery app configured for long, idempotent study analyses.

    A sender needs no ``include``; the workers' app (``ctdx.worker.celery_app``) names its tasks.
    """
    url, transport_options = broker_config(settings)
    app = Celery("ctdx", broker=url, include=list(include))
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
