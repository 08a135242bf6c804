"""Reconciliation from the database: the database decides, the broker only wakes.

A Celery message can be lost without anyone noticing: Redis restarted without
persistence, a ``FLUSHALL``, a failover, or a worker whose main process was
killed while it analysed a study (its message waits in Redis's unacked set
until the visibility timeout, over an hour). The database knows better. Every
listener (in its outbox dispatcher) and every worker (in its main process)
runs :func:`republish_stalled` regularly; it finds

- study versions ``queued`` (handed to the broker) that no worker has claimed
  for ``CTDX_QUEUED_TIMEOUT`` seconds, and
- study versions ``processing`` whose claim's heartbeat is older than
  ``CTDX_CLAIM_TIMEOUT`` (the worker is gone),

and publishes them again. The outbox row is the lock and the clock: one
``UPDATE ... SET dispatched_at = now`` over the candidates (picked ``FOR UPDATE
SKIP LOCKED`` on PostgreSQL; SQLite's single writer serialises the statement)
claims them for this round, so with many listeners and workers each stalled
version is published once per timeout, not once per process. The claim in
``analyses`` (:mod:`ctdx.worker.claim`) keeps the analysis once-only: the new task
takes the stale claim over, and a duplicate message finds the work done.

Reports are reconciled too (:func:`publish_missing_reports`, workers only):
an analysed study without export rows (the worker died between storing the
results and recording its reports) gets them built and recorded; pending
exports themselves are already retried from the export outbox.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, delete, exists, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from ctdx.db.models import (
    Analysis,
    AnalysisState,
    Export,
    OutboxEntry,
    ServiceHeartbeat,
    ServiceKind,
    StudyVersion,
    VersionState,
    utcnow,
)
from ctdx.db.session import session_scope
from ctdx.db.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "PublishFailed",
    "Republished",
    "ServiceBeat",
    "publish_missing_reports",
    "reconcile_interval",
    "republish_stalled",
    "take_stalled",
]

#: Stalled versions taken per round (the rest follow in the next round).
BATCH = 50
#: Analyses without exports are looked for this far back (not every old study when a PACS
#: is configured later).
REPORT_LOOKBACK = timedelta(days=1)
#: Heartbeat rows of services not seen for this long are deleted.
HEARTBEAT_RETENTION = timedelta(days=1)

REASON_UNCLAIMED = "unclaimed"
REASON_STALE_CLAIM = "stale claim"


class PublishFailed(Exception):
    """The broker did not take the message (``ctdx.scp.outbox.BrokerUnavailable`` is one)."""


@dataclass(frozen=True)
class Republished:
    study_version_id: int
    reason: str  # REASON_UNCLAIMED | REASON_STALE_CLAIM
    sent: bool


def reconcile_interval(settings: Settings) -> float:
    """Seconds between rounds: a tenth of the shorter timeout, between 1 and 15 s.

    With the defaults a killed worker's study is published again at most 15 s
    after its claim went stale.
    """
    shortest = min(settings.claim_timeout, settings.queued_timeout)
    return max(1.0, min(15.0, shortest / 10))


def _stalled_condition(now: datetime, claim_timeout: float, queued_timeout: float) -> Any:
    stale_before = now - timedelta(seconds=claim_timeout)
    unclaimed_before = now - timedelta(seconds=queued_timeout)
    stale_claim = exists().where(
        Analysis.study_version_id == StudyVersion.id,
        Analysis.state == AnalysisState.RUNNING.value,
        Analysis.heartbeat_at < stale_before,
    )
    return and_(
        OutboxEntry.dispatched_at.is_not(None),
        or_(
            and_(
                StudyVersion.state == VersionState.QUEUED.value,
                OutboxEntry.dispatched_at < unclaimed_before,
            ),
            and_(
                StudyVersion.state == VersionState.PROCESSING.value,
                OutboxEntry.dispatched_at < stale_before,
                stale_claim,
            ),
        ),
    )


def take_stalled(
    engine: Engine,
    now: datetime,
    claim_timeout: float,
    queued_timeout: float,
    limit: int = BATCH,
) -> list[tuple[int, str]]:
    """Claim this round's stalled versions (their outbox rows are stamped ``now``).

    Returns ``(study_version_id, reason)`` pairs; another process calling at the
    same time gets none of them.
    """
    candidates = (
        select(OutboxEntry.id)
        .join(StudyVersion, StudyVersion.id == OutboxEntry.study_version_id)
        .where(_stalled_condition(now, claim_timeout, queued_timeout))
        .order_by(OutboxEntry.id)
        .limit(limit)
    )
    if engine.dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True, of=OutboxEntry)
    statement = (
        update(OutboxEntry)
        .where(OutboxEntry.id.in_(candidates.scalar_subquery()))
        .values(dispatched_at=now, attempts=OutboxEntry.attempts + 1)
        .returning(OutboxEntry.study_version_id)
        .execution_options(synchronize_session=False)
    )
    with session_scope(engine) as session:
        ids = [int(row) for row in session.scalars(statement)]
        if not ids:
            return []
        states = dict(
            session.execute(
                select(StudyVersion.id, StudyVersion.state).where(StudyVersion.id.in_(ids))
            ).all()
        )
    return [
        (vid, REASON_UNCLAIMED if states.get(vid) == VersionState.QUEUED else REASON_STALE_CLAIM)
        for vid in sorted(ids)
    ]


def _back_to_outbox(engine: Engine, study_version_id: int, error: str, now: datetime) -> None:
    """The broker refused: the row waits undispatched, for whichever dispatcher comes next."""
    with session_scope(engine) as session:
        session.execute(
            update(OutboxEntry)
            .where(OutboxEntry.study_version_id == study_version_id)
            .values(dispatched_at=None, next_attempt_at=now, last_error=error[:2000])
            .execution_options(synchronize_session=False)
        )


def republish_stalled(
    engine: Engine,
    send: Callable[[int], None],
    claim_timeout: float,
    queued_timeout: float,
    now: datetime | None = None,
) -> list[Republished]:
    """One reconciliation round: find stalled versions and ``send`` each again.

    ``send`` raises :class:`PublishFailed` when the broker is unreachable; the
    version then goes back into the outbox (undispatched), where the listener's
    dispatcher retries it, and the round stops.
    """
    now = now or utcnow()
    taken = take_stalled(engine, now, claim_timeout, queued_timeout)
    done: list[Republished] = []
    for index, (version_id, reason) in enumerate(taken):
        try:
            send(version_id)
        except PublishFailed as exc:
            for rest_id, _ in taken[index:]:
                _back_to_outbox(engine, rest_id, str(exc), now)
            logger.warning(
                "reconcile: broker unavailable; %d stalled study version(s) back in the outbox: %s",
                len(taken) - index, exc,
            )
            done.extend(Republished(vid, why, False) for vid, why in taken[index:])
            break
        wait = queued_timeout if reason == REASON_UNCLAIMED else claim_timeout
        logger.warning(
            "study version %d: %s for over %.0f s; published to the broker again",
            version_id,
            "queued without a worker claiming it" if reason == REASON_UNCLAIMED
            else "its worker's claim has no heartbeat",
            wait,
        )
        done.append(Republished(version_id, reason, True))
    return done


def publish_missing_reports(
    engine: Engine,
    settings: Settings,
    publish: Callable[[Engine, int, Settings], None],
    skip: set[int],
    now: datetime | None = None,
) -> list[int]:
    """Analyses finished at least ``claim_timeout`` ago with no export rows: publish them.

    Analyses whose report objects failed the report checks (``report_problems``)
    are left alone: building them again gives the same objects.

    Only when a PACS is configured, and only for analyses of the last day.
    ``skip`` holds analyses whose reports could not be built in this process
    (tried once, then left to an operator); it is updated here.
    """
    if not settings.pacs_host:
        return []
    now = now or utcnow()
    settled = now - timedelta(seconds=settings.claim_timeout)
    with session_scope(engine) as session:
        ids = list(
            session.scalars(
                select(Analysis.id)
                .where(
                    Analysis.state == AnalysisState.ANALYSED.value,
                    Analysis.finished_at < settled,
                    Analysis.finished_at > now - REPORT_LOOKBACK,
                    # objects refused by the report checks are an operator's, not a retry's
                    Analysis.report_problems.is_(None),
                    ~exists().where(Export.analysis_id == Analysis.id),
                )
                .order_by(Analysis.id)
                .limit(BATCH)
            )
        )
    published = []
    for analysis_id in ids:
        if analysis_id in skip:
            continue
        logger.warning("analysis %d: analysed but no report recorded; publishing it now",
                       analysis_id)
        try:
            publish(engine, analysis_id, settings)
        except SQLAlchemyError:
            raise
        except Exception:  # a report that cannot be built: logged once, left to an operator
            logger.exception("analysis %d: its reports cannot be built", analysis_id)
            skip.add(analysis_id)
            continue
        published.append(analysis_id)
    return published


class ServiceBeat:
    """This process's row in ``service_heartbeats`` (``ctdx status`` reads them)."""

    def __init__(self, engine: Engine, kind: ServiceKind, detail: dict[str, Any] | None = None):
        self.engine = engine
        self.kind = kind
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.name = f"{kind.value}:{self.host}:{self.pid}"[:192]
        self.detail = detail

    def beat(self, now: datetime | None = None) -> None:
        now = now or utcnow()
        with session_scope(self.engine) as session:
            updated = session.execute(
                update(ServiceHeartbeat)
                .where(ServiceHeartbeat.name == self.name)
                .values(seen_at=now)
                .execution_options(synchronize_session=False)
            )
            if updated.rowcount == 0:  # type: ignore[attr-defined]
                session.add(ServiceHeartbeat(
                    name=self.name, kind=self.kind.value, host=self.host[:128], pid=self.pid,
                    started_at=now, seen_at=now, detail=self.detail,
                ))
                session.execute(
                    delete(ServiceHeartbeat).where(
                        ServiceHeartbeat.seen_at < now - HEARTBEAT_RETENTION
                    )
                )

    def leave(self) -> None:
        """A clean stop: the row goes (a killed process's row just ages)."""
        with session_scope(self.engine) as session:
            session.execute(delete(ServiceHeartbeat).where(ServiceHeartbeat.name == self.name))


class Periodic(threading.Thread):
    """Runs ``step`` every ``interval`` seconds, or at once when :attr:`wake` is set, in a
    daemon thread until ``stop()``; a failing step is logged and tried again next time."""

    def __init__(self, name: str, step: Callable[[], object], interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self.step = step
        self.interval = interval
        self.wake = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.step()
            except SQLAlchemyError as exc:
                logger.warning("%s: database error (%s); trying again", self.name,
                               type(exc).__name__)
            except Exception:
                logger.exception("%s failed; trying again", self.name)
            self.wake.wait(self.interval)
            self.wake.clear()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.join(timeout=10)
