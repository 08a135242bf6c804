"""The outbox: completed study versions handed to the broker, at least once, in order.

A version completes in the database first (state ``complete`` plus an
``outbox`` row, one transaction: :mod:`scp.completion`). The dispatcher then
sends ``ctdx.process_study(study_version_id)`` with the task id
``study-version-<id>`` and, after the broker accepted it, marks the row
dispatched and the version ``queued``. While the broker is down the row stays
and is retried every ``CTDX_OUTBOX_POLL_SECONDS``; nothing is lost.

A crash between the send and the mark re-sends the same version with the
same task id after restart. That duplicate is harmless by contract: the worker
claims a version idempotently (one analysis per version and model) and drops a
task whose version is already being, or has been, processed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from kombu.exceptions import KombuError
from sqlalchemy import Engine, Table, select, update
from sqlalchemy.orm import Session

from db.models import OutboxEntry, StudyVersion, VersionState, utcnow
from db.session import session_scope
from db.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "BrokerUnavailable",
    "CelerySender",
    "DueEntry",
    "OutboxDispatcher",
    "Sender",
    "due_entries",
]

_OUTBOX: Table = OutboxEntry.__table__  # type: ignore[assignment]
_VERSIONS: Table = StudyVersion.__table__  # type: ignore[assignment]


class BrokerUnavailable(Exception):
    """The broker did not take the message; the outbox keeps it."""


class Sender(Protocol):
    def send(self, study_version_id: int) -> None:
        """Hand one version to the queue; raise :class:`BrokerUnavailable` when it cannot."""


class CelerySender:
    """Sends ``ctdx.process_study`` through the project's Celery app (JSON, by name)."""

    def __init__(self, settings: Settings, queue: str | None = None) -> None:
        from worker.celery_app import QUEUE, make_celery

        self.app = make_celery(settings)
        self.queue = queue or QUEUE

    def send(self, study_version_id: int) -> None:
        from worker.celery_app import TASK_PROCESS_STUDY, task_id_for

        try:
            self.app.send_task(
                TASK_PROCESS_STUDY,
                args=[study_version_id],
                task_id=task_id_for(study_version_id),
                queue=self.queue,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
            )
        except (KombuError, OSError) as exc:
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.app.close()


@dataclass(frozen=True)
class DueEntry:
    outbox_id: int
    study_version_id: int
    attempts: int


def due_entries(session: Session, now: datetime, limit: int = 100) -> list[DueEntry]:
    """Undispatched rows whose next attempt is due, oldest first."""
    rows = session.execute(
        select(_OUTBOX.c.id, _OUTBOX.c.study_version_id, _OUTBOX.c.attempts)
        .where(_OUTBOX.c.dispatched_at.is_(None), _OUTBOX.c.next_attempt_at <= now)
        .order_by(_OUTBOX.c.id)
        .limit(limit)
    )
    return [DueEntry(int(r.id), int(r.study_version_id), int(r.attempts)) for r in rows]


def mark_dispatched(session: Session, entry: DueEntry, now: datetime) -> None:
    session.execute(
        update(_OUTBOX)
        .where(_OUTBOX.c.id == entry.outbox_id)
        .values(dispatched_at=now, attempts=_OUTBOX.c.attempts + 1, last_error=None)
    )
    # only from `complete`: the worker may already have claimed it (processing or later)
    session.execute(
        update(_VERSIONS)
        .where(
            _VERSIONS.c.id == entry.study_version_id,
            _VERSIONS.c.state == VersionState.COMPLETE.value,
        )
        .values(state=VersionState.QUEUED.value)
    )


def mark_failed(session: Session, entry: DueEntry, error: str, retry_at: datetime) -> None:
    session.execute(
        update(_OUTBOX)
        .where(_OUTBOX.c.id == entry.outbox_id)
        .values(attempts=_OUTBOX.c.attempts + 1, last_error=error[:2000], next_attempt_at=retry_at)
    )


class OutboxDispatcher:
    """Hands due outbox rows to a :class:`Sender`; one per listener installation."""

    def __init__(self, engine: Engine, sender: Sender, retry_seconds: float) -> None:
        self.engine = engine
        self.sender = sender
        self.retry_seconds = retry_seconds
        self._broker_down = False  # log the outage once, not at every retry

    def dispatch_due(self) -> int:
        """Send every due row; stop at the first broker failure. Returns how many were sent."""
        with session_scope(self.engine) as session:
            entries = due_entries(session, utcnow())
        sent = 0
        for entry in entries:
            try:
                self.sender.send(entry.study_version_id)
            except BrokerUnavailable as exc:
                now = utcnow()
                with session_scope(self.engine) as session:
                    retry_at = now + timedelta(seconds=self.retry_seconds)
                    mark_failed(session, entry, str(exc), retry_at)
                log = logger.debug if self._broker_down else logger.warning
                log(
                    "broker unavailable, study version id %d stays in the outbox (attempt %d): %s",
                    entry.study_version_id, entry.attempts + 1, exc,
                )
                self._broker_down = True
                break
            if self._broker_down:
                logger.info("broker reachable again; sending the outbox")
                self._broker_down = False
            with session_scope(self.engine) as session:
                mark_dispatched(session, entry, utcnow())
            logger.info("study version id %d handed to the queue", entry.study_version_id)
            sent += 1
        return sent
