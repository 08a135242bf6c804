"""Operator actions on the pipeline's state, each recorded in ``audit_log``.

The functions take a caller-owned session and never commit: the action and its
audit row are committed together by the caller (``with session_scope(...)``),
so an action is never done without its record, nor recorded without being done.

The actions only put work back where the owning component looks for it:
``requeue_study`` re-opens the study version's outbox row, which the
listener's outbox dispatcher hands to the broker again; ``retry_export`` makes
an export pending again, which the report sender picks up at its next pass.
Refusals are domain exceptions; the CLI turns them into messages and exit codes.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ctdx.db.models import (
    Analysis,
    AnalysisState,
    AuditEntry,
    Export,
    ExportState,
    OutboxEntry,
    SliceResult,
    SpoolPrune,
    Study,
    StudyVersion,
    VersionState,
    utcnow,
)
from ctdx.db.queries import StudyNotFound

logger = logging.getLogger(__name__)

ACTION_REQUEUE = "studies.requeue"
ACTION_RETRY_EXPORT = "exports.retry"

# Versions whose analysis is still on its way: a requeue would only duplicate the task.
_IN_FLIGHT = (VersionState.COMPLETE, VersionState.QUEUED, VersionState.PROCESSING)


class OperationError(Exception):
    """An operator action that cannot be done; the message says why."""


class ExportNotFound(OperationError, LookupError):
    def __init__(self, export_id: int) -> None:
        super().__init__(f"no export with id {export_id}")
        self.export_id = export_id


class ActionRefused(OperationError):
    """The action makes no sense in the current state (nothing was changed)."""


class StudyStillArriving(ActionRefused):
    pass


class StudyInFlight(ActionRefused):
    pass


class StudyPruned(ActionRefused):
    """The study's source images were deleted from the spool (scp/retention.py)."""


class ExportAlreadyDelivered(ActionRefused):
    pass


class ExportBeingSent(ActionRefused):
    pass


@dataclass(frozen=True)
class Requeued:
    study_instance_uid: str
    version: int
    study_version_id: int
    previous_state: str
    audit_id: int


@dataclass(frozen=True)
class Retried:
    export_id: int
    study_instance_uid: str
    sop_instance_uid: str
    destination: str
    previous_state: str
    previous_attempts: int
    audit_id: int


def default_actor() -> str:
    """``user@host`` of the operator running the command (the audit's "who")."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def record(
    session: Session, *, actor: str, action: str, target: str, detail: dict[str, Any],
    at: datetime | None = None,
) -> AuditEntry:
    """Add one audit row (flushed, so it has an id) in the caller's transaction."""
    entry = AuditEntry(
        at=at or utcnow(),
        actor=actor[:128],
        action=action,
        target=target,
        detail=json.dumps(detail, sort_keys=True),
    )
    session.add(entry)
    session.flush()
    return entry


def requeue_study(
    session: Session,
    study_instance_uid: str,
    actor: str,
    *,
    force: bool = False,
    now: datetime | None = None,
) -> Requeued:
    """Send the study's newest version to be analysed again.

    Refused while the version is still arriving (:class:`StudyStillArriving`),
    and while it is waiting, queued or being analysed (:class:`StudyInFlight`)
    unless ``force`` is given: for a task the broker lost, which would
    otherwise stay ``queued`` for ever. The version goes back to ``complete``
    and its outbox row is re-opened (``dispatched_at`` cleared, due now).

    Workers skip a version already finished with their model (see
    ``ctdx.worker.claim``), so failed analyses of the version are deleted (with
    their slice rows; the audit detail keeps their reasons) to be tried again.
    Analysed results are kept: an analysed version is analysed again only by a
    worker with another model.
    """
    now = now or utcnow()
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == study_instance_uid)
    ).one_or_none()
    if study is None:
        raise StudyNotFound(study_instance_uid)
    version = session.scalars(
        select(StudyVersion)
        .where(StudyVersion.study_id == study.id)
        .order_by(StudyVersion.version.desc())
        .limit(1)
        .with_for_update()
    ).one_or_none()
    if version is None or version.state == VersionState.RECEIVING:
        raise StudyStillArriving(
            f"study {study_instance_uid} is still arriving (version "
            f"{version.version if version else 1}); it is queued by itself once complete"
        )
    pruned = session.execute(
        select(SpoolPrune.pruned_at, SpoolPrune.claimed_at, SpoolPrune.reason)
        .join(StudyVersion, StudyVersion.id == SpoolPrune.study_version_id)
        .where(StudyVersion.study_id == study.id)
        .order_by(SpoolPrune.id)
        .limit(1)
    ).first()
    if pruned is not None:
        when = (pruned.pruned_at or pruned.claimed_at).isoformat(timespec="seconds")
        raise StudyPruned(
            f"study {study_instance_uid}: its images were deleted from the spool on {when} "
            f"({pruned.reason}); there is nothing left to analyse"
        )
    if version.state in _IN_FLIGHT and not force:
        where = {
            VersionState.COMPLETE: "is waiting in the outbox to be queued",
            VersionState.QUEUED: "is already queued and not finished",
            VersionState.PROCESSING: "is being analysed",
        }[VersionState(version.state)]
        raise StudyInFlight(
            f"study {study_instance_uid} version {version.version} {where}; "
            "use --force only if its task was lost"
        )

    outbox = session.scalars(
        select(OutboxEntry).where(OutboxEntry.study_version_id == version.id).with_for_update()
    ).one_or_none()
    analyses = session.scalars(
        select(Analysis).where(Analysis.study_version_id == version.id).order_by(Analysis.id)
    ).all()
    with_exports = set(
        session.scalars(
            select(Export.analysis_id).where(
                Export.analysis_id.in_([a.id for a in analyses])
            )
        )
    )
    # A worker skips a version already analysed or failed with its model; a failed
    # analysis is removed (its reason kept in the audit detail) so it is tried again.
    removed = [
        a for a in analyses if a.state == AnalysisState.FAILED and a.id not in with_exports
    ]
    detail: dict[str, Any] = {
        "study_version_id": version.id,
        "version": version.version,
        "previous_state": version.state,
        "forced": force,
        "outbox": None
        if outbox is None
        else {
            "attempts": outbox.attempts,
            "dispatched_at": _iso(outbox.dispatched_at),
            "last_error": outbox.last_error,
        },
        "analyses": [
            {
                "id": a.id,
                "state": a.state,
                "model_uid": a.model_uid,
                "attempts": a.attempts,
                "failure_reason": a.failure_reason,
                "removed": a in removed,
            }
            for a in analyses
        ],
    }
    for analysis in removed:
        session.execute(delete(SliceResult).where(SliceResult.analysis_id == analysis.id))
        session.delete(analysis)
    previous_state = version.state
    version.state = VersionState.COMPLETE
    if outbox is None:
        session.add(
            OutboxEntry(study_version_id=version.id, created_at=now, next_attempt_at=now)
        )
    else:
        outbox.dispatched_at = None
        outbox.next_attempt_at = now
        outbox.attempts = 0
        outbox.last_error = None
    entry = record(
        session, actor=actor, action=ACTION_REQUEUE, target=study_instance_uid, detail=detail,
        at=now,
    )
    logger.info(
        "study %s version %d (id %d) requeued from %s by %s",
        study_instance_uid, version.version, version.id, previous_state, actor,
    )
    return Requeued(
        study_instance_uid=study_instance_uid,
        version=version.version,
        study_version_id=version.id,
        previous_state=previous_state,
        audit_id=entry.id,
    )


def _retry_one(session: Session, export: Export, actor: str, now: datetime) -> Retried:
    study_uid = session.scalar(
        select(Study.study_instance_uid)
        .join(StudyVersion, StudyVersion.study_id == Study.id)
        .join(Analysis, Analysis.study_version_id == StudyVersion.id)
        .where(Analysis.id == export.analysis_id)
    )
    detail = {
        "previous_state": export.state,
        "attempts": export.attempts,
        "last_status": export.last_status,
        "last_error": export.last_error,
        "next_attempt_at": _iso(export.next_attempt_at),
        "last_attempt_at": _iso(export.last_attempt_at),
        "sop_instance_uid": export.sop_instance_uid,
        "destination": export.destination,
        "study_instance_uid": study_uid,
    }
    previous_state, previous_attempts = export.state, export.attempts
    export.state = ExportState.PENDING
    export.next_attempt_at = now
    export.attempts = 0  # a fresh back-off schedule; the old count is in the audit detail
    export.claimed_by = None  # an expired claim: its holder's outcome no longer counts
    entry = record(
        session, actor=actor, action=ACTION_RETRY_EXPORT, target=str(export.id), detail=detail,
        at=now,
    )
    logger.info(
        "export %d (%s to %s) retried from %s after %d attempts by %s",
        export.id, export.sop_instance_uid, export.destination, previous_state,
        previous_attempts, actor,
    )
    return Retried(
        export_id=export.id,
        study_instance_uid=study_uid or "",
        sop_instance_uid=export.sop_instance_uid,
        destination=export.destination,
        previous_state=previous_state,
        previous_attempts=previous_attempts,
        audit_id=entry.id,
    )


def retry_export(
    session: Session,
    export_id: int | None = None,
    *,
    dead: bool = False,
    actor: str,
    now: datetime | None = None,
) -> list[Retried]:
    """Make one export (``export_id``) or every dead one (``dead=True``) pending, due now.

    A delivered export is refused (:class:`ExportAlreadyDelivered`): sending it
    again would be a duplicate; so is one a sender holds a live claim on
    (:class:`ExportBeingSent`). A pending one is simply brought forward.
    Returns what was retried (empty when ``dead`` and none is dead).
    """
    if (export_id is None) == (not dead):
        raise ValueError("give exactly one of export_id and dead=True")
    now = now or utcnow()
    if export_id is not None:
        export = session.scalars(
            select(Export).where(Export.id == export_id).with_for_update()
        ).one_or_none()
        if export is None:
            raise ExportNotFound(export_id)
        if export.claimed_by is not None and export.next_attempt_at > now:
            raise ExportBeingSent(
                f"export {export_id} is being sent right now (claimed by {export.claimed_by} "
                f"until {export.next_attempt_at.isoformat(timespec='seconds')}); "
                "see `ctdx exports list` afterwards"
            )
        if export.state == ExportState.DELIVERED:
            raise ExportAlreadyDelivered(
                f"export {export_id} was already delivered to {export.destination}"
                + (f" at {export.delivered_at.isoformat()}" if export.delivered_at else "")
                + "; nothing to retry"
            )
        return [_retry_one(session, export, actor, now)]
    exports = session.scalars(
        select(Export).where(Export.state == ExportState.DEAD).order_by(Export.id).with_for_update()
    ).all()  # dead rows are never claimed: no sender is working on them
    return [_retry_one(session, export, actor, now) for export in exports]
