"""How the pipeline is doing, from the database, the broker and the disk (``ctdx status``).

:func:`pipeline_numbers` reads the numbers (also served as Prometheus gauges);
:func:`assess` turns numbers and probes into :class:`Problem` lines, each with
what to do. A problem is ``degraded`` when studies still flow or will once
the cause is gone (a backlog, a dead export), ``down`` when nothing can flow
(no database, no broker, no worker, no listener, disk under the guard).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ctdx.db.models import (
    Analysis,
    AnalysisState,
    Export,
    ExportState,
    OutboxEntry,
    ServiceHeartbeat,
    ServiceKind,
    StudyVersion,
    VersionState,
)
from ctdx.db.settings import Settings

logger = logging.getLogger(__name__)

#: A service that has not refreshed its heartbeat for this long counts as gone. Services
#: beat every few seconds (at most every 15 s, ``ctdx.db.reconcile.reconcile_interval``).
SERVICE_SILENT_SECONDS = 90.0
#: A pending export whose next attempt is this far in the past has nobody delivering it.
EXPORT_OVERDUE_SECONDS = 300.0


class Health(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"

    @property
    def exit_code(self) -> int:
        return {Health.HEALTHY: 0, Health.DEGRADED: 1, Health.DOWN: 2}[self]


@dataclass(frozen=True)
class Problem:
    check: str  # database | broker | outbox | queue | claims | exports | disk | worker | listener
    severity: Health
    message: str
    action: str


@dataclass(frozen=True)
class PipelineNumbers:
    """What the database says about the pipeline at ``now``."""

    outbox_waiting: int  # completed versions not yet handed to the broker
    outbox_oldest_seconds: float | None
    queued_unclaimed_overdue: int  # queued, not claimed, completed over CTDX_QUEUED_TIMEOUT ago
    stale_claims: int  # running analyses without a heartbeat for CTDX_CLAIM_TIMEOUT
    versions_by_state: dict[str, int]
    studies_completed: int  # versions that ever completed (monotonic)
    exports_by_state: dict[str, int]
    exports_overdue: int  # pending, next attempt long past: nobody delivers
    oldest_undelivered_seconds: float | None  # age of the oldest pending export
    last_seen_seconds: dict[str, float | None] = field(default_factory=dict)  # per service kind


def _age(now: datetime, then: datetime | None) -> float | None:
    return None if then is None else round(max(0.0, (now - then).total_seconds()), 3)


def pipeline_numbers(session: Session, settings: Settings, now: datetime) -> PipelineNumbers:
    outbox = session.execute(
        select(func.count(), func.min(OutboxEntry.created_at)).where(
            OutboxEntry.dispatched_at.is_(None)
        )
    ).one()
    unclaimed = session.scalar(
        select(func.count())
        .select_from(OutboxEntry)
        .join(StudyVersion, StudyVersion.id == OutboxEntry.study_version_id)
        .where(
            StudyVersion.state == VersionState.QUEUED.value,
            OutboxEntry.created_at < now - timedelta(seconds=settings.queued_timeout),
        )
    )
    stale = session.scalar(
        select(func.count()).select_from(Analysis).where(
            Analysis.state == AnalysisState.RUNNING.value,
            Analysis.heartbeat_at < now - timedelta(seconds=settings.claim_timeout),
        )
    )
    by_state = dict(
        session.execute(
            select(StudyVersion.state, func.count()).group_by(StudyVersion.state)
        ).all()
    )
    completed = session.scalar(
        select(func.count()).select_from(StudyVersion).where(
            StudyVersion.completed_at.is_not(None)
        )
    )
    exports = dict(
        session.execute(select(Export.state, func.count()).group_by(Export.state)).all()
    )
    overdue = session.scalar(
        select(func.count()).select_from(Export).where(
            Export.state == ExportState.PENDING.value,
            Export.next_attempt_at < now - timedelta(seconds=EXPORT_OVERDUE_SECONDS),
        )
    )
    oldest_pending = session.scalar(
        select(func.min(Export.created_at)).where(Export.state == ExportState.PENDING.value)
    )
    seen = dict(
        session.execute(
            select(ServiceHeartbeat.kind, func.max(ServiceHeartbeat.seen_at)).group_by(
                ServiceHeartbeat.kind
            )
        ).all()
    )
    return PipelineNumbers(
        outbox_waiting=int(outbox[0] or 0),
        outbox_oldest_seconds=_age(now, outbox[1]),
        queued_unclaimed_overdue=int(unclaimed or 0),
        stale_claims=int(stale or 0),
        versions_by_state={str(k): int(v) for k, v in by_state.items()},
        studies_completed=int(completed or 0),
        exports_by_state={str(k): int(v) for k, v in exports.items()},
        exports_overdue=int(overdue or 0),
        oldest_undelivered_seconds=_age(now, oldest_pending),
        last_seen_seconds={kind.value: _age(now, seen.get(kind.value)) for kind in ServiceKind},
    )


def numbers_dict(numbers: PipelineNumbers) -> dict[str, Any]:
    return asdict(numbers)


# --- probes outside the database ------------------------------------------------------


def broker_problem(settings: Settings, timeout: float = 3.0) -> str | None:
    """``None`` when the broker accepts a connection, else why not (one line, no secrets)."""
    from kombu.connection import Connection
    from kombu.exceptions import KombuError

    from ctdx.db.broker import broker_config

    url, options = broker_config(settings)
    if url.startswith("memory://"):
        return None
    try:
        with Connection(  # type: ignore[no-untyped-call]
            url, connect_timeout=timeout, transport_options=options
        ) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                   timeout=timeout)
    except (KombuError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing parent)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


# --- judging ----------------------------------------------------------------------------


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def assess(
    settings: Settings,
    numbers: PipelineNumbers,
    broker_error: str | None,
    disk_free: int | None,
) -> list[Problem]:
    """The problems the numbers and probes show, worst first."""
    found: list[Problem] = []
    if broker_error is not None:
        found.append(Problem(
            "broker", Health.DOWN,
            f"broker unreachable ({broker_error}); completed studies wait in the outbox",
            "start Redis or fix CTDX_BROKER_URL; nothing is lost, the outbox sends them when "
            "it is back",
        ))
    if disk_free is not None and disk_free < settings.min_free_bytes:
        found.append(Problem(
            "disk", Health.DOWN,
            f"{disk_free / 1e9:.2f} GB free under {settings.data_dir}, below the guard "
            f"CTDX_MIN_FREE_BYTES ({settings.min_free_bytes / 1e9:.2f} GB): C-STORE is refused "
            "(0xA700)",
            "free disk space under the data dir (old spool files, logs) or add storage",
        ))
    elif disk_free is not None and disk_free < 2 * settings.min_free_bytes:
        found.append(Problem(
            "disk", Health.DEGRADED,
            f"{disk_free / 1e9:.2f} GB free under {settings.data_dir}, less than twice the guard",
            "free disk space before the listener starts refusing studies",
        ))
    for kind, what in ((ServiceKind.LISTENER, "listener (ctdx scp)"),
                       (ServiceKind.WORKER, "worker (ctdx worker)")):
        age = numbers.last_seen_seconds.get(kind.value)
        if age is None or age > SERVICE_SILENT_SECONDS:
            found.append(Problem(
                kind.value, Health.DOWN,
                f"no {what} seen " + ("ever" if age is None else f"for {_minutes(age)}"),
                f"start the {what} and check its log",
            ))
    if numbers.outbox_oldest_seconds is not None and \
            numbers.outbox_oldest_seconds > settings.outbox_alert_seconds:
        found.append(Problem(
            "outbox", Health.DEGRADED,
            f"{numbers.outbox_waiting} completed study version(s) waiting in the outbox, the "
            f"oldest for {_minutes(numbers.outbox_oldest_seconds)}",
            "check the broker (CTDX_BROKER_URL) and the listener's log",
        ))
    if numbers.queued_unclaimed_overdue:
        found.append(Problem(
            "queue", Health.DEGRADED,
            f"{numbers.queued_unclaimed_overdue} study version(s) completed over "
            f"{_minutes(settings.queued_timeout)} ago and not yet taken by a worker",
            "they are published again automatically; if this stays, start workers or check "
            "that they consume the queue",
        ))
    if numbers.stale_claims:
        found.append(Problem(
            "claims", Health.DEGRADED,
            f"{numbers.stale_claims} analysis(es) without a worker heartbeat for over "
            f"{_minutes(settings.claim_timeout)} (worker killed?)",
            "they are published again automatically and another worker takes them over; if "
            "this stays, start a worker (ctdx worker)",
        ))
    dead = numbers.exports_by_state.get(ExportState.DEAD.value, 0)
    if dead:
        found.append(Problem(
            "exports", Health.DEGRADED,
            f"{dead} report(s) dead-lettered: the PACS refused them or was down too long",
            "ctdx exports list --state dead; fix the PACS, then ctdx exports retry --dead",
        ))
    if numbers.exports_overdue:
        found.append(Problem(
            "exports", Health.DEGRADED,
            f"{numbers.exports_overdue} report(s) overdue: pending, next attempt over "
            f"{_minutes(EXPORT_OVERDUE_SECONDS)} ago",
            "no delivery loop is running: start ctdx worker (with --export-delivery)",
        ))
    order = {Health.DOWN: 0, Health.DEGRADED: 1, Health.HEALTHY: 2}
    return sorted(found, key=lambda p: order[p.severity])


def overall(problems: list[Problem]) -> Health:
    if any(p.severity is Health.DOWN for p in problems):
        return Health.DOWN
    return Health.DEGRADED if problems else Health.HEALTHY


# --- what `ctdx results stats` adds: what waits now ------------------------------------


@dataclass(frozen=True)
class Waiting:
    """Study versions on their way to a result now (whatever period a listing covers)."""

    outbox: int  # complete, not yet handed to the broker
    queued: int  # handed to the broker, not claimed
    processing: int  # claimed by a worker
    oldest_outbox_seconds: float | None  # age of the oldest outbox row not handed over


def waiting_now(session: Session, now: datetime) -> Waiting:
    outbox = session.execute(
        select(func.count(), func.min(OutboxEntry.created_at)).where(
            OutboxEntry.dispatched_at.is_(None)
        )
    ).one()
    states = dict(
        session.execute(
            select(StudyVersion.state, func.count())
            .where(StudyVersion.state.in_([VersionState.QUEUED.value,
                                           VersionState.PROCESSING.value]))
            .group_by(StudyVersion.state)
        ).all()
    )
    return Waiting(
        outbox=int(outbox[0] or 0),
        queued=int(states.get(VersionState.QUEUED.value, 0)),
        processing=int(states.get(VersionState.PROCESSING.value, 0)),
        oldest_outbox_seconds=_age(now, outbox[1]),
    )


def waiting_json(w: Waiting) -> dict[str, Any]:
    return asdict(w)


def waiting_text(w: Waiting) -> str:
    oldest = (f", the oldest in the outbox for {_minutes(w.oldest_outbox_seconds)}"
              if w.oldest_outbox_seconds is not None else "")
    return (f"Waiting now: {w.outbox} in the outbox (not yet handed to the broker){oldest}, "
            f"{w.queued} queued, {w.processing} being analysed")
