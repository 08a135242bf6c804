"""The export outbox: one ``exports`` row per report object and destination.

Life of a row (``ctdx.db.models.ExportState``)::

    pending --claim--> (being sent: claimed_by set, next_attempt_at = lease end)
        --success--> delivered
        --failure--> pending (next_attempt_at = now + backoff) ... --> dead

Everything lives in the database, so exports survive restarts of every
process. A claim is one compare-and-set ``UPDATE``: on PostgreSQL the
candidates are picked ``FOR UPDATE SKIP LOCKED`` so concurrent delivery loops
split the work; on SQLite the single writer serialises the same statement.
Either way a row is claimed by one loop at a time, and only the claimant's
outcome is recorded (``WHERE claimed_by = :token``). A claimant that dies
mid-send leaves the row to be claimed again when its lease ends; the PACS then
sees the same SOP Instance UID again, a duplicate and not a second report.

Attempts are counted at claim time, so a send that crashes the process still
uses up an attempt and a poisonous export cannot loop forever.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ctdx.db.models import Export, ExportState
from ctdx.db.session import session_scope
from ctdx.db.settings import Settings
from ctdx.worker.report.uids import ReportKind

logger = logging.getLogger(__name__)

#: Exports claimed per round of a delivery loop.
CLAIM_BATCH = 16


@dataclass(frozen=True)
class Destination:
    """A C-STORE peer, stored in ``exports.destination`` as ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Destination:
        ae_title, _, address = text.partition("@")
        host, _, port = address.rpartition(":")
        if not ae_title or not host or not port.isdigit():
            raise ValueError(f"not a destination (AE@host:port): {text!r}")
        return cls(ae_title=ae_title, host=host, port=int(port))


def destination_from(settings: Settings) -> Destination | None:
    """The configured PACS, or ``None`` when reports are built but not sent."""
    if not settings.pacs_host:
        return None
    return Destination(settings.pacs_ae_title, settings.pacs_host, settings.pacs_port)


@dataclass(frozen=True)
class StoredObject:
    """A report object written under the data dir, ready to be exported."""

    kind: ReportKind
    sop_instance_uid: str
    path: str  # relative to the data dir
    replaces_sop_instance_uid: str | None = None


@dataclass(frozen=True)
class ClaimedExport:
    """An export this process is sending now; ``token`` proves the claim."""

    id: int
    kind: str
    destination: str
    sop_instance_uid: str
    path: str
    attempts: int
    token: str


@dataclass(frozen=True)
class ExportView:
    """One row for people (the CLI) and tests."""

    id: int
    analysis_id: int
    kind: str
    destination: str
    sop_instance_uid: str
    replaces_sop_instance_uid: str | None
    state: str
    attempts: int
    last_error: str | None
    last_status: int | None
    next_attempt_at: datetime
    last_attempt_at: datetime | None
    delivered_at: datetime | None

    @classmethod
    def of(cls, row: Export) -> ExportView:
        return cls(
            id=row.id,
            analysis_id=row.analysis_id,
            kind=row.kind,
            destination=row.destination,
            sop_instance_uid=row.sop_instance_uid,
            replaces_sop_instance_uid=row.replaces_sop_instance_uid,
            state=row.state,
            attempts=row.attempts,
            last_error=row.last_error,
            last_status=row.last_status,
            next_attempt_at=row.next_attempt_at,
            last_attempt_at=row.last_attempt_at,
            delivered_at=row.delivered_at,
        )


def claim_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}/{uuid.uuid4().hex[:12]}"


def backoff_seconds(attempts: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Delay after the ``attempts``-th failure: doubling from the base, capped, with 10% jitter.

    The jitter keeps exports that failed together (a PACS outage) from
    retrying in lockstep.
    """
    base = settings.export_backoff_seconds * 2.0 ** max(attempts - 1, 0)
    jitter = (rng or random).uniform(0.9, 1.1)
    return min(base, settings.export_backoff_max_seconds) * jitter


def claim_lease(settings: Settings) -> timedelta:
    """How long a claim holds: beyond the worst case of one association (connect, store)."""
    return timedelta(seconds=4 * settings.network_timeout + 60)


# --- writing ------------------------------------------------------------------------------


def export_ids_of(session: Session, analysis_id: int) -> list[int]:
    return list(
        session.scalars(
            select(Export.id).where(Export.analysis_id == analysis_id).order_by(Export.id)
        )
    )


def record_exports(
    engine: Engine,
    analysis_id: int,
    objects: Sequence[StoredObject],
    destination: Destination,
    now: datetime,
) -> list[int]:
    """One pending row per object for ``destination``, all in one transaction; their ids.

    All or nothing, so a crash never leaves an analysis with only some of its
    objects recorded (``publish_reports`` skips analyses that have exports).
    Objects recorded before (a concurrent publish) keep their row.
    """
    try:
        ids = _record_once(engine, analysis_id, objects, destination, now)
    except IntegrityError:  # a concurrent publish inserted them between our select and insert
        ids = _record_once(engine, analysis_id, objects, destination, now)
    logger.info("export outbox: analysis %d has exports %s for %s", analysis_id, ids, destination)
    return ids


def _record_once(
    engine: Engine,
    analysis_id: int,
    objects: Sequence[StoredObject],
    destination: Destination,
    now: datetime,
) -> list[int]:
    with session_scope(engine) as session:
        known = {
            row.sop_instance_uid: row.id
            for row in session.execute(
                select(Export.sop_instance_uid, Export.id).where(
                    Export.sop_instance_uid.in_([o.sop_instance_uid for o in objects]),
                    Export.destination == str(destination),
                )
            )
        }
        rows = [
            Export(
                analysis_id=analysis_id,
                kind=obj.kind,
                destination=str(destination),
                sop_instance_uid=obj.sop_instance_uid,
                replaces_sop_instance_uid=obj.replaces_sop_instance_uid,
                path=obj.path,
                state=ExportState.PENDING,
                attempts=0,
                created_at=now,
                next_attempt_at=now,
            )
            for obj in objects
            if obj.sop_instance_uid not in known
        ]
        session.add_all(rows)
        session.flush()
        known.update({row.sop_instance_uid: row.id for row in rows})
    return [known[obj.sop_instance_uid] for obj in objects]


def claim_due(
    engine: Engine,
    settings: Settings,
    now: datetime,
    ids: Sequence[int] | None = None,
    limit: int = CLAIM_BATCH,
) -> list[ClaimedExport]:
    """Atomically claim up to ``limit`` pending exports due at ``now`` (only ``ids`` if given)."""
    token = claim_token()
    due = (
        select(Export.id)
        .where(Export.state == ExportState.PENDING, Export.next_attempt_at <= now)
        .order_by(Export.next_attempt_at, Export.id)
        .limit(limit)
    )
    if ids is not None:
        due = due.where(Export.id.in_(list(ids)))
    if engine.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    statement = (
        update(Export)
        .where(Export.id.in_(due.scalar_subquery()))
        .values(
            claimed_by=token,
            attempts=Export.attempts + 1,
            last_attempt_at=now,
            next_attempt_at=now + claim_lease(settings),
        )
        .returning(
            Export.id,
            Export.kind,
            Export.destination,
            Export.sop_instance_uid,
            Export.path,
            Export.attempts,
        )
        .execution_options(synchronize_session=False)
    )
    with session_scope(engine) as session:
        rows = session.execute(statement).all()
    return [
        ClaimedExport(
            id=row.id,
            kind=row.kind,
            destination=row.destination,
            sop_instance_uid=row.sop_instance_uid,
            path=row.path,
            attempts=row.attempts,
            token=token,
        )
        for row in rows
    ]


def record_delivered(engine: Engine, claimed: ClaimedExport, status: int, now: datetime) -> bool:
    """Mark delivered; ``False`` when the claim had been lost (lease ended, another took it)."""
    with session_scope(engine) as session:
        result = session.execute(
            update(Export)
            .where(Export.id == claimed.id, Export.claimed_by == claimed.token)
            .values(
                state=ExportState.DELIVERED,
                delivered_at=now,
                last_status=status,
                last_error=None,
                claimed_by=None,
            )
            .execution_options(synchronize_session=False)
        )
        won: bool = result.rowcount == 1  # type: ignore[attr-defined]
    if not won:
        logger.warning("export %d delivered after its claim was lost", claimed.id)
    return won


def record_failure(
    engine: Engine,
    settings: Settings,
    claimed: ClaimedExport,
    error: str,
    status: int | None,
    now: datetime,
) -> ExportState:
    """Schedule a retry with backoff, or dead-letter when the attempts are used up."""
    dead = claimed.attempts >= settings.export_max_attempts
    state = ExportState.DEAD if dead else ExportState.PENDING
    next_attempt = (
        now if dead else now + timedelta(seconds=backoff_seconds(claimed.attempts, settings))
    )
    with session_scope(engine) as session:
        session.execute(
            update(Export)
            .where(Export.id == claimed.id, Export.claimed_by == claimed.token)
            .values(
                state=state,
                last_error=error[:2000],
                last_status=status,
                next_attempt_at=next_attempt,
                claimed_by=None,
            )
            .execution_options(synchronize_session=False)
        )
    if dead:
        logger.error(
            "export %d (%s %s to %s) dead after %d attempts: %s",
            claimed.id,
            claimed.kind,
            claimed.sop_instance_uid,
            claimed.destination,
            claimed.attempts,
            error,
        )
    else:
        logger.warning(
            "export %d attempt %d failed (%s); next attempt at %s",
            claimed.id,
            claimed.attempts,
            error,
            next_attempt.isoformat(timespec="seconds"),
        )
    return state


# --- reading (operators retry with `ctdx exports retry`) ---------------------------------


def list_exports(
    session: Session, state: ExportState | None = None, analysis_id: int | None = None
) -> list[ExportView]:
    query = select(Export).order_by(Export.id)
    if state is not None:
        query = query.where(Export.state == state)
    if analysis_id is not None:
        query = query.where(Export.analysis_id == analysis_id)
    return [ExportView.of(row) for row in session.scalars(query)]
