"""The Celery task ``ctdx.process_study``: thin, like a web view.

It turns the outcome of :func:`ctdx.worker.service.process_study_version` (plain,
testable without Celery) into what the broker should do:

- transient database or broker errors: retried with exponential backoff and
  jitter (``autoretry_for``), a bounded number of times; the claim was released
  first, so the retry can take the study over at once;
- the claim is held by a live worker: nothing now; the task looks again after
  ``claim_timeout`` (the holder finishes, or its heartbeat goes stale and the
  re-check takes over): a redelivery after a killed worker on another host is
  never lost;
- this worker cannot analyse (no model, unreadable checkpoint): the study is
  not to blame; retried after a minute;
- everything else (analysed, failed with a reason, already done): acked.

Import-light: torch and the method load in the first task of each process (or
in ``worker_process_init``, see ``ctdx.worker.celery_app``), not at import.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from celery import Task

from ctdx.db import alerts
from ctdx.db.broker import TASK_PROCESS_STUDY
from ctdx.db.settings import Settings
from ctdx.worker.celery_app import app
from ctdx.worker.errors import TRANSIENT_ERRORS, WorkerNotReady

logger = logging.getLogger(__name__)

MAX_RETRIES = 8
NOT_READY_COUNTDOWN = 60


def settings_of(task: Task) -> Settings:
    """The settings the Celery app was built with (``ctdx.worker.celery_app.make_celery``)."""
    settings = task.app.conf.ctdx_settings
    assert isinstance(settings, Settings)
    return settings


def busy_rechecks(settings: Settings) -> int:
    """Re-checks that outlast any live holder: it is killed at the time limit, then goes stale."""
    return math.ceil(settings.task_time_limit / settings.claim_timeout) + 2


@app.task(  # type: ignore[untyped-decorator]  # celery is untyped
    bind=True,
    name=TASK_PROCESS_STUDY,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=MAX_RETRIES,
)
def process_study(self: Task, study_version_id: int) -> dict[str, Any]:
    """Analyse one study version (idempotent); the id is ``study_versions.id``."""
    from ctdx.worker import runtime, service  # torch and the method: not at import

    settings = settings_of(self)
    try:
        models = runtime.get_models(settings)
    except WorkerNotReady as exc:
        logger.error("study version %d: worker not ready: %s", study_version_id, exc)
        if self.request.is_eager:
            raise
        raise self.retry(exc=exc, countdown=NOT_READY_COUNTDOWN) from exc
    result = service.process_study_version(
        runtime.engine(settings), settings, models, study_version_id
    )
    if result.analysis_id is not None and result.outcome in (
        service.Outcome.ANALYSED, service.Outcome.FAILED, service.Outcome.ALREADY_DONE
    ):  # a study called COVID-19, or failed: queued for the webhooks (db.alerts); again for a
        # redelivered task (a crash before the alert was queued), which alerts only once
        alerts.emit(runtime.engine(settings), settings, "analysis", result.analysis_id)
    if result.outcome is service.Outcome.BUSY and not self.request.is_eager:
        if self.request.retries < MAX_RETRIES + busy_rechecks(settings):
            raise self.retry(
                countdown=settings.claim_timeout + 1,
                max_retries=self.request.retries + 1,
            )
        logger.error("study version %d: still held by another worker after %d checks; giving up",
                     study_version_id, self.request.retries)
    return result.as_dict()
