"""When is a study version complete? Quiet period, MPPS, and restart recovery.

A version in state ``receiving`` becomes ``complete`` (and gets its outbox row,
in the same transaction) when either

- **quiet**: no instance of it arrived for ``CTDX_QUIET_SECONDS`` and no live
  association holds a lease on it (an association that sent one of its
  instances holds a lease until it ends; each listener process renews the
  leases of its live associations, so a crashed process's leases expire), or
- **mpps**: an MPPS step set to COMPLETED references SOP instances that have
  all arrived; their open versions complete at once, leases or not.

Every state change is a guarded ``UPDATE ... WHERE state = 'receiving'``: the
C-STORE path bumps ``last_received_at`` under the same guard, so an instance
and a completion racing on one version serialise on its row, and the instance
that loses opens version n+1 (see :mod:`ctdx.scp.registry`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from sqlalchemy import Table, delete, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ctdx.db.models import (
    Instance,
    OutboxEntry,
    PerformedProcedureStep,
    ReceivingLease,
    StudyVersion,
    VersionState,
)
from ctdx.scp import mpps

logger = logging.getLogger(__name__)

__all__ = [
    "REASON_MPPS",
    "REASON_QUIET",
    "complete_mpps_step",
    "complete_quiet",
    "drop_dead_leases",
    "pending_mpps_steps",
    "quiet_candidates",
    "resume_receiving",
]

REASON_QUIET = "quiet"
REASON_MPPS = "mpps"

_VERSIONS: Table = StudyVersion.__table__  # type: ignore[assignment]
_LEASES: Table = ReceivingLease.__table__  # type: ignore[assignment]
_OUTBOX: Table = OutboxEntry.__table__  # type: ignore[assignment]
_STEPS: Table = PerformedProcedureStep.__table__  # type: ignore[assignment]
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
_IN_CHUNK = 500


def _enqueue(session: Session, study_version_id: int, now: datetime) -> None:
    """The outbox row, in the completing transaction (at most one per version)."""
    values = {
        "study_version_id": study_version_id,
        "task_name": "ctdx.process_study",
        "created_at": now,
        "next_attempt_at": now,
        "attempts": 0,
    }
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    session.execute(
        module.insert(_OUTBOX).values(**values).on_conflict_do_nothing(
            index_elements=["study_version_id"]
        )
    )


def quiet_candidates(session: Session, now: datetime, quiet_seconds: float) -> list[int]:
    """Receiving versions whose last instance is older than the quiet period."""
    cutoff = now - timedelta(seconds=quiet_seconds)
    rows = session.execute(
        select(_VERSIONS.c.id).where(
            _VERSIONS.c.state == VersionState.RECEIVING.value,
            _VERSIONS.c.last_received_at <= cutoff,
        )
    )
    return [int(r) for r in rows.scalars()]


def complete_quiet(
    session: Session, study_version_id: int, now: datetime, quiet_seconds: float
) -> bool:
    """Complete one version if it is still quiet and unleased; ``True`` when it was."""
    cutoff = now - timedelta(seconds=quiet_seconds)
    live_lease = exists().where(
        _LEASES.c.study_version_id == _VERSIONS.c.id, _LEASES.c.expires_at > now
    )
    result = session.execute(
        update(_VERSIONS)
        .where(
            _VERSIONS.c.id == study_version_id,
            _VERSIONS.c.state == VersionState.RECEIVING.value,
            _VERSIONS.c.last_received_at <= cutoff,
            ~live_lease,
        )
        .values(
            state=VersionState.COMPLETE.value, completed_at=now, completion_reason=REASON_QUIET
        )
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    session.execute(delete(_LEASES).where(_LEASES.c.study_version_id == study_version_id))
    _enqueue(session, study_version_id, now)
    _log_completed(session, study_version_id, REASON_QUIET)
    return True


def pending_mpps_steps(session: Session, since: datetime) -> list[int]:
    """COMPLETED steps not yet applied (updated after ``since``: older ones are given up)."""
    rows = session.execute(
        select(_STEPS.c.id).where(
            _STEPS.c.status == mpps.COMPLETED,
            _STEPS.c.applied_at.is_(None),
            _STEPS.c.updated_at >= since,
        )
    )
    return [int(r) for r in rows.scalars()]


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


def complete_mpps_step(session: Session, step_id: int, now: datetime) -> list[int]:
    """Apply a COMPLETED step whose referenced instances have all arrived.

    Returns the version ids it completed; an empty list when instances are
    still missing (the step stays pending) or there was nothing to complete.
    """
    step = session.execute(
        select(_STEPS.c.referenced_sop_instance_uids, _STEPS.c.status, _STEPS.c.applied_at).where(
            _STEPS.c.id == step_id
        )
    ).one()
    if step.status != mpps.COMPLETED or step.applied_at is not None:
        return []
    referenced = [u for u in str(step.referenced_sop_instance_uids or "").split("\n") if u]
    if not referenced:
        # a step that names no instance cannot say a study is whole: the quiet period decides
        session.execute(update(_STEPS).where(_STEPS.c.id == step_id).values(applied_at=now))
        logger.info(
            "MPPS step id %d names no instances; completion left to the quiet period", step_id
        )
        return []
    versions: set[int] = set()
    found = 0
    for chunk in _chunks(referenced):
        rows = session.execute(
            select(_INSTANCES.c.study_version_id).where(_INSTANCES.c.sop_instance_uid.in_(chunk))
        ).scalars()
        for version_id in rows:
            versions.add(int(version_id))
            found += 1
    if found < len(referenced):
        return []
    completed: list[int] = []
    for version_id in sorted(versions):
        result = session.execute(
            update(_VERSIONS)
            .where(
                _VERSIONS.c.id == version_id,
                _VERSIONS.c.state == VersionState.RECEIVING.value,
            )
            .values(
                state=VersionState.COMPLETE.value, completed_at=now, completion_reason=REASON_MPPS
            )
        )
        if result.rowcount:  # type: ignore[attr-defined]
            session.execute(delete(_LEASES).where(_LEASES.c.study_version_id == version_id))
            _enqueue(session, version_id, now)
            _log_completed(session, version_id, REASON_MPPS)
            completed.append(version_id)
    session.execute(update(_STEPS).where(_STEPS.c.id == step_id).values(applied_at=now))
    return completed


def _log_completed(session: Session, study_version_id: int, reason: str) -> None:
    row = session.execute(
        select(StudyVersion.version, StudyVersion.instance_count, StudyVersion.study_id).where(
            StudyVersion.id == study_version_id
        )
    ).one()
    logger.info(
        "study version id %d (study id %d, version %d, %d instances) complete: %s",
        study_version_id, row.study_id, row.version, row.instance_count, reason,
    )


def expire_leases(session: Session, now: datetime) -> None:
    """Forget leases nobody renewed (their process died)."""
    session.execute(delete(_LEASES).where(_LEASES.c.expires_at <= now))


def resume_receiving(session: Session, now: datetime) -> int:
    """After a restart, studies still arriving get a full quiet period again.

    Their senders were cut off by the crash and are likely to resend the rest;
    completing them at once would queue half a study.
    """
    result = session.execute(
        update(_VERSIONS)
        .where(_VERSIONS.c.state == VersionState.RECEIVING.value)
        .values(last_received_at=now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drop_dead_leases(
    session: Session,
    hostname: str | None = None,
    alive: Callable[[int], bool] = _pid_alive,
) -> int:
    """Delete leases held by earlier listener processes of this host (e.g. after kill -9).

    Called once at start-up, before this process holds any lease: a lease
    naming this very pid is a previous incarnation's (containers reuse pids).
    """
    prefix = f"{hostname or socket.gethostname()}:"
    own = os.getpid()
    holders = session.execute(select(_LEASES.c.holder).distinct()).scalars()
    dead = []
    for holder in holders:
        text = str(holder)
        if not text.startswith(prefix):
            continue
        try:
            pid = int(text[len(prefix) :].split(":")[0])
        except ValueError:
            continue
        if pid == own or not alive(pid):
            dead.append(text)
    if dead:
        session.execute(delete(_LEASES).where(_LEASES.c.holder.in_(dead)))
    return len(dead)
