"""The workers' reconciliation loop (the database part is ``ctdx.db.reconcile``).

Each worker's main process runs a :class:`WorkerReconciler`: stalled or lost study versions
are published again and reports that were never recorded are built, from the database.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from ctdx.db.models import ServiceKind
from ctdx.db.reconcile import (
    Periodic,
    PublishFailed,
    ServiceBeat,
    publish_missing_reports,
    reconcile_interval,
    republish_stalled,
)
from ctdx.db.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["WorkerReconciler"]


class WorkerReconciler:
    """A worker main process's round: its heartbeat, stalled versions, missing reports.

    ``queue`` is where stalled versions are published (the worker's first
    consumed queue). The engine has no pool (a connection per round), so the
    pool processes the main process forks later inherit no open connection.
    """

    def __init__(self, settings: Settings, queue: str, detail: dict[str, Any] | None = None):
        from sqlalchemy.pool import NullPool

        from ctdx.db.broker import make_celery
        from ctdx.db.session import make_engine

        self.settings = settings
        self.queue = queue
        self.engine = make_engine(settings.resolved_database_url, poolclass=NullPool)
        self.app = make_celery(settings)
        self.beat = ServiceBeat(self.engine, ServiceKind.WORKER, detail)
        self._unbuildable: set[int] = set()

    def send(self, study_version_id: int) -> None:
        from kombu.exceptions import KombuError

        from ctdx.db.broker import TASK_PROCESS_STUDY, task_id_for

        try:
            self.app.send_task(
                TASK_PROCESS_STUDY, args=[study_version_id],
                task_id=task_id_for(study_version_id), queue=self.queue,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
            )
        except (KombuError, OSError) as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc

    def run_once(self) -> None:
        from ctdx.worker.metrics import worker_metrics

        self.beat.beat()
        for item in republish_stalled(
            self.engine, self.send, self.settings.claim_timeout, self.settings.queued_timeout
        ):
            if item.sent:
                worker_metrics().republished.labels(reason=item.reason).inc()
        from ctdx.worker.report import publish_reports

        recovered = publish_missing_reports(
            self.engine, self.settings, publish_reports, self._unbuildable
        )
        if recovered:
            worker_metrics().reports_recovered.inc(len(recovered))

    def start(self) -> Periodic:
        thread = Periodic("ctdx-reconcile", self.run_once, reconcile_interval(self.settings))
        thread.start()
        logger.info("reconciliation every %.1f s (stale claims after %.0f s, unclaimed after "
                    "%.0f s), republishing to queue %s", thread.interval,
                    self.settings.claim_timeout, self.settings.queued_timeout, self.queue)
        return thread

    def close(self) -> None:
        try:
            self.beat.leave()
        except SQLAlchemyError:
            logger.warning("worker heartbeat row not removed (database unavailable)")
        self.app.close()
        self.engine.dispose()
