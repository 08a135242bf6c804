"""The outbox: completed study versions handed to the broker, at least once, in order.

A version completes in the database first (state ``complete`` plus an
``outbox`` row, one transaction: :mod:`ctdx.scp.completion`). The dispatcher then
sends ``ctdx.process_study(study_version_id)`` with the task id
``study-version-<id>`` and, after the broker accepted it, marks the row
dispatched and the version ``queued``. While the broker is down the row stays
and is retried every ``CTDX_OUTBOX_POLL_SECONDS``; nothing is lost.

A crash between the send and the mark re-sends the same version with the
same task id after restart. That duplicate is harmless by contract: the worker
claims a version idempotently (one analysis per version and model) and drops a
task whose version is already being, or has been, processed.

The dispatcher also reconciles (:mod:`ctdx.worker.reconcile`): every few seconds it
publishes again the versions the broker lost (queued but never claimed, or
claimed by a worker whose heartbeat stopped), leaves the listener's heartbeat
for ``ctdx status``, and says once, as a warning, when the broker is
unreachable at start or when studies wait in the outbox longer than
``CTDX_OUTBOX_ALERT_SECONDS``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from kombu.exceptions import KombuError
from sqlalchemy import Engine, Table, func, select, update
from sqlalchemy.orm import Session

from ctdx.db.models import OutboxEntry, ServiceKind, StudyVersion, VersionState, utcnow
from ctdx.db.reconcile import PublishFailed, ServiceBeat, reconcile_interval, republish_stalled
from ctdx.db.session import session_scope
from ctdx.db.settings import Settings
from ctdx.scp.metrics import listener_metrics

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


class BrokerUnavailable(PublishFailed):
    """The broker did not take the message; the outbox keeps it."""


class Sender(Protocol):
    def send(self, study_version_id: int) -> None:
        """Hand one version to the queue; raise :class:`BrokerUnavailable` when it cannot."""


class CelerySender:
    """Sends ``ctdx.process_study`` through the project's Celery app (JSON, by name)."""

    def __init__(self, settings: Settings, queue: str | None = None) -> None:
        from ctdx.db.broker import QUEUE, make_celery

        self.app = make_celery(settings)
        self.queue = queue or QUEUE

    def send(self, study_version_id: int) -> None:
        from ctdx.db.broker import TASK_PROCESS_STUDY, task_id_for

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

    def probe(self, timeout: float = 5.0) -> None:
        """Connect to the broker once; :class:`BrokerUnavailable` when it does not answer."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                       timeout=timeout)
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


def oldest_waiting(session: Session) -> tuple[int, datetime | None]:
    """Undispatched rows and the creation time of the oldest (the outbox's depth and age)."""
    row = session.execute(
        select(func.count(), func.min(_OUTBOX.c.created_at)).where(
            _OUTBOX.c.dispatched_at.is_(None)
        )
    ).one()
    oldest = row[1]
    if oldest is not None and oldest.tzinfo is None:  # SQLite returns naive UTC via Core
        from datetime import UTC

        oldest = oldest.replace(tzinfo=UTC)
    return int(row[0] or 0), oldest


class OutboxDispatcher:
    """Hands due outbox rows to a :class:`Sender`; one per listener installation.

    With ``settings`` it also reconciles (see the module docstring) every
    :func:`ctdx.db.reconcile.reconcile_interval` seconds.
    """

    def __init__(
        self, engine: Engine, sender: Sender, retry_seconds: float,
        settings: Settings | None = None,
    ) -> None:
        self.engine = engine
        self.sender = sender
        self.retry_seconds = retry_seconds
        self.settings = settings
        self._broker_down = False  # log the outage once, not at every retry
        self._probed = False
        self._backlog_warned = False
        self._next_reconcile = 0.0
        self._beat = ServiceBeat(engine, ServiceKind.LISTENER) if settings is not None else None

    def dispatch_due(self) -> int:
        """Send every due row; stop at the first broker failure. Returns how many were sent."""
        if not self._probed:
            self._probed = True
            self._probe_broker()
        if self.settings is not None and time.monotonic() >= self._next_reconcile:
            self._next_reconcile = time.monotonic() + reconcile_interval(self.settings)
            self.reconcile()
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
                listener_metrics().broker_up.set(0)
                break
            if self._broker_down:
                logger.info("broker reachable again; sending the outbox")
                self._broker_down = False
            listener_metrics().broker_up.set(1)
            with session_scope(self.engine) as session:
                mark_dispatched(session, entry, utcnow())
            logger.info("study version id %d handed to the queue", entry.study_version_id)
            listener_metrics().dispatched.inc()
            sent += 1
        return sent

    def _probe_broker(self, at_start: bool = True) -> None:
        """Connect once (a sender without ``probe`` is taken as it is): said loudly at start."""
        probe = getattr(self.sender, "probe", None)
        if not callable(probe):
            return
        try:
            probe()
        except BrokerUnavailable as exc:
            self._broker_down = True
            listener_metrics().broker_up.set(0)
            if at_start:
                logger.warning(
                    "broker unreachable at start (%s): completed studies will wait in the "
                    "outbox until it answers; check CTDX_BROKER_URL and that Redis runs", exc,
                )
            return
        if self._broker_down:
            logger.info("broker reachable again")
            self._broker_down = False
        listener_metrics().broker_up.set(1)

    def reconcile(self) -> None:
        """Heartbeat, the backlog warning, and publishing again what the broker lost."""
        settings = self.settings
        assert settings is not None and self._beat is not None
        self._beat.beat()
        with session_scope(self.engine) as session:
            waiting, oldest = oldest_waiting(session)
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        if age > settings.outbox_alert_seconds and not self._backlog_warned:
            self._backlog_warned = True
            logger.warning(
                "%d completed study version(s) wait in the outbox, the oldest for %.0f s: the "
                "broker does not take them (check CTDX_BROKER_URL and Redis; ctdx status)",
                waiting, age,
            )
        elif age <= settings.outbox_alert_seconds and self._backlog_warned:
            self._backlog_warned = False
            logger.info("outbox backlog cleared (%d waiting)", waiting)
        if self._broker_down:  # no send told us otherwise (an empty outbox): look again
            self._probe_broker(at_start=False)
        if self._broker_down:
            return  # republishing needs the broker; the outbox retries as usual
        for item in republish_stalled(
            self.engine, self.sender.send, settings.claim_timeout, settings.queued_timeout
        ):
            if item.sent:
                listener_metrics().republished.labels(reason=item.reason).inc()
