"""Studies sent by ``ctdx selftest``: how they are recognised and where their reports go.

A self-test study carries Patient ID :data:`SELFTEST_PATIENT_ID` (and its own
Study Instance UID each run). That mark alone makes it a test study: it is left
out of ``ctdx results stats`` and never alerts. ``ctdx selftest`` also records
the study in ``selftest_studies`` *before* sending it, with the destination of
its reports: the stand-in PACS the command started (``AE@host:port``), or NULL
with ``--to-pacs`` (the configured PACS). A study marked as a test that was
not recorded (sent by hand) gets no export at all: test images never reach the
PACS by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ctdx.db.models import Analysis, SelftestStudy, Study, StudyVersion
from ctdx.db.session import session_scope

SELFTEST_PATIENT_ID = "CTDX-SELFTEST"


def is_test_study() -> ColumnElement[bool]:
    """SQL condition on ``studies``: the study is a self-test study."""
    return Study.patient_id == SELFTEST_PATIENT_ID


def not_test_version() -> ColumnElement[bool]:
    """SQL condition on ``study_versions``: the version is not of a self-test study."""
    return StudyVersion.study_id.not_in(select(Study.id).where(is_test_study()))


def register(engine: Engine, study_instance_uid: str, destination: str | None) -> None:
    """Record a test study before it is sent; ``destination`` None = the configured PACS."""
    try:
        with session_scope(engine) as session:
            session.add(
                SelftestStudy(study_instance_uid=study_instance_uid, destination=destination)
            )
    except IntegrityError:
        raise ValueError(f"study {study_instance_uid} is already a self-test study") from None


@dataclass(frozen=True)
class SelftestRouting:
    """Whether an analysis is of a self-test study, and where its reports go if so."""

    is_test: bool
    registered: bool  # recorded by `ctdx selftest` (else: no export at all for a test study)
    destination: str | None  # AE@host:port; None with registered = the configured PACS


def routing_of(session: Session, analysis_id: int) -> SelftestRouting:
    """Whether the analysis is of a test study, and the destination recorded for it."""
    row = session.execute(
        select(Study.study_instance_uid, Study.patient_id)
        .join(StudyVersion, StudyVersion.study_id == Study.id)
        .join(Analysis, Analysis.study_version_id == StudyVersion.id)
        .where(Analysis.id == analysis_id)
    ).one_or_none()
    if row is None:
        return SelftestRouting(False, False, None)
    registered = session.scalars(
        select(SelftestStudy).where(SelftestStudy.study_instance_uid == row.study_instance_uid)
    ).one_or_none()
    is_test = row.patient_id == SELFTEST_PATIENT_ID or registered is not None
    return SelftestRouting(
        is_test, registered is not None, registered.destination if registered else None
    )
