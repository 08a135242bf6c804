"""Modality Performed Procedure Step (N-CREATE / N-SET): what a step says, and its rows.

Only three things matter to ctdx: the step's status, the study it belongs to
(Scheduled Step Attributes Sequence > Study Instance UID) and the SOP instances
it says were produced (Performed Series Sequence > Referenced Image Sequence
and Referenced Non-Image Composite SOP Instance Sequence). Everything else in
the attribute list (it holds patient data) is neither stored nor logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from ctdx.db.models import PerformedProcedureStep
from ctdx.scp.status import Rejected, Status
from ctdx.scp.uids import is_valid_uid

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLETED",
    "DISCONTINUED",
    "IN_PROGRESS",
    "StepReport",
    "create_step",
    "parse_step",
    "set_step",
]

IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"
_FINAL = (COMPLETED, DISCONTINUED)


@dataclass(frozen=True)
class StepReport:
    """What an N-CREATE attribute list or an N-SET modification list says."""

    status: str | None
    study_instance_uid: str | None
    referenced_sop_instance_uids: tuple[str, ...] | None  # None: not in this message


def _sequence(ds: Dataset, keyword: str) -> list[Dataset]:
    value: Any = ds.get(keyword)
    return list(value) if value else []


def parse_step(ds: Dataset) -> StepReport:
    """Read the three facts; raises :class:`Rejected` when the data set cannot be decoded."""
    try:
        raw_status = ds.get("PerformedProcedureStepStatus")
        # CS: upper case; only leading and trailing spaces (and a NUL pad) are insignificant.
        # Case is not folded: "in progress" is no Defined Term (PS3.4 F.7.2.1 wants 0x0106)
        status = None if raw_status in (None, "") else str(raw_status).strip(" \x00")
        study_uid = None
        for item in _sequence(ds, "ScheduledStepAttributesSequence"):
            candidate = str(item.get("StudyInstanceUID", "") or "").strip("\x00 ")
            if is_valid_uid(candidate):
                study_uid = candidate
                break
        references: tuple[str, ...] | None = None
        if "PerformedSeriesSequence" in ds:
            found: list[str] = []
            for series in _sequence(ds, "PerformedSeriesSequence"):
                for keyword in (
                    "ReferencedImageSequence",
                    "ReferencedNonImageCompositeSOPInstanceSequence",
                ):
                    for ref in _sequence(series, keyword):
                        uid = str(ref.get("ReferencedSOPInstanceUID", "") or "").strip("\x00 ")
                        if is_valid_uid(uid):
                            found.append(uid)
            references = tuple(dict.fromkeys(found))
    except Exception as exc:  # pydicom raises assorted errors on malformed values
        raise Rejected(Status.PROCESSING_FAILURE, "MPPS data set cannot be decoded") from exc
    if status is not None and status not in (IN_PROGRESS, *_FINAL):
        raise Rejected(Status.INVALID_ATTRIBUTE_VALUE, "Performed Procedure Step Status invalid")
    return StepReport(status, study_uid, references)


def create_step(session: Session, sop_instance_uid: str, report: StepReport, now: datetime) -> None:
    """N-CREATE: a new step, which must start IN PROGRESS (PS3.4 F.7.2.1)."""
    if report.status is None:
        raise Rejected(Status.MISSING_ATTRIBUTE, "Performed Procedure Step Status missing")
    if report.status != IN_PROGRESS:
        raise Rejected(Status.INVALID_ATTRIBUTE_VALUE, "a new step must be IN PROGRESS")
    exists = session.execute(
        select(PerformedProcedureStep.id).where(
            PerformedProcedureStep.sop_instance_uid == sop_instance_uid
        )
    ).first()
    if exists is not None:
        raise Rejected(Status.DUPLICATE_SOP_INSTANCE, "MPPS instance already exists")
    session.add(
        PerformedProcedureStep(
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=report.study_instance_uid,
            status=report.status,
            referenced_sop_instance_uids="\n".join(report.referenced_sop_instance_uids or ()),
            created_at=now,
            updated_at=now,
        )
    )
    session.flush()


def set_step(session: Session, sop_instance_uid: str, report: StepReport, now: datetime) -> int:
    """N-SET: update a step that is still IN PROGRESS; returns its row id."""
    step = session.scalars(
        select(PerformedProcedureStep)
        .where(PerformedProcedureStep.sop_instance_uid == sop_instance_uid)
        .with_for_update()
    ).one_or_none()
    if step is None:
        raise Rejected(Status.NO_SUCH_SOP_INSTANCE, "no such MPPS instance")
    if step.status in _FINAL:
        raise Rejected(
            Status.PROCESSING_FAILURE, f"step is {step.status}; it may no longer be updated"
        )
    if report.status is not None:
        step.status = report.status
    if report.study_instance_uid is not None:
        step.study_instance_uid = report.study_instance_uid
    if report.referenced_sop_instance_uids is not None:
        step.referenced_sop_instance_uids = "\n".join(report.referenced_sop_instance_uids)
    step.updated_at = now
    session.flush()
    return step.id
