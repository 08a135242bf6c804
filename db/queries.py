"""Read-only questions the operators ask of the results database.

Every function takes a caller-owned :class:`~sqlalchemy.orm.Session`, never
commits, and returns frozen dataclasses: ORM objects do not leave this module,
so the CLI (or anything else) cannot lazy-load or modify rows by accident.

Patient name and ID are PHI: they are only read when ``include_phi=True`` and
are ``None`` otherwise, so output code cannot leak what it never received.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.orm import Session, aliased

from ctdx.db.models import (
    Analysis,
    AnalysisState,
    AuditEntry,
    Export,
    ExportState,
    Instance,
    OutboxEntry,
    Series,
    SliceResult,
    SpoolPrune,
    Study,
    StudyVersion,
)
from ctdx.db.selftest_studies import not_test_version

logger = logging.getLogger(__name__)

KEY_SLICES = 5  # most COVID-like slices shown per analysis (the SR references them too)
REPORT_KIND = "sr"  # turnaround is measured to the delivery of the structured report


class QueryError(Exception):
    """A question that has no answer: translated to a message and exit code by the CLI."""


class StudyNotFound(QueryError, LookupError):
    """No study has this Study Instance UID or accession number."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no study with Study Instance UID or accession number {key!r}")
        self.key = key


class AmbiguousStudy(QueryError):
    """An accession number shared by several studies: the UID must be given."""

    def __init__(self, key: str, uids: Sequence[str]) -> None:
        super().__init__(
            f"accession number {key!r} belongs to {len(uids)} studies; give one of their "
            f"Study Instance UIDs: {', '.join(uids)}"
        )
        self.key = key
        self.uids = tuple(uids)


# --- rows handed out ------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRow:
    """A study in a listing: its newest version and that version's newest analysis."""

    study_instance_uid: str
    accession_number: str | None
    study_date: str | None  # ISO date when the DICOM date is valid, else as stored
    version: int
    status: str  # db.models.VersionState
    calling_ae_title: str | None
    received_at: datetime  # first instance of this version
    last_received_at: datetime
    completed_at: datetime | None
    instance_count: int
    analysis_state: str | None
    decision: str | None
    fraction_covid19: float | None
    model_name: str | None
    model_version: str | None
    report_state: str | None  # summary of the analysis' exports; None = none yet
    patient_id: str | None = None
    patient_name: str | None = None


@dataclass(frozen=True)
class SeriesInfo:
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_count: int


@dataclass(frozen=True)
class OutboxInfo:
    """Hand-over of a version to the queue (``dispatched_at`` None = not yet handed over)."""

    created_at: datetime
    dispatched_at: datetime | None
    attempts: int
    last_error: str | None
    next_attempt_at: datetime


@dataclass(frozen=True)
class KeySlice:
    slice_index: int
    sop_instance_uid: str
    frame_number: int | None  # 1-based frame of a multi-frame (Enhanced CT) instance
    position_z: float | None
    p_covid19: float
    predicted_class: str | None
    manifestation: str | None


@dataclass(frozen=True)
class ExportInfo:
    """One report object for one destination, with its delivery history so far."""

    id: int
    kind: str
    destination: str
    sop_instance_uid: str
    replaces_sop_instance_uid: str | None
    state: str  # db.models.ExportState
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: datetime
    last_attempt_at: datetime | None
    next_attempt_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True)
class AnalysisInfo:
    id: int
    state: str  # db.models.AnalysisState
    model_name: str
    model_version: str
    model_uid: str
    manifestation_model_uid: str | None
    worker: str | None
    device: str | None
    attempts: int
    claimed_at: datetime
    finished_at: datetime | None
    series_instance_uid: str | None
    series_selection: str | None
    slices_total: int | None
    slices_analysed: int | None
    slices_skipped: int | None
    fraction_covid19: float | None
    fraction_other_pneumonia: float | None
    fraction_normal: float | None
    decision: str | None
    threshold: float | None
    manifestation_counts: dict[str, Any] | None  # a copy; read-only by convention
    timings: dict[str, Any] | None  # seconds per stage
    failure_reason: str | None
    report_problems: str | None  # report objects not sent: failed the checks (issue 13)
    key_slices: tuple[KeySlice, ...]
    exports: tuple[ExportInfo, ...]


@dataclass(frozen=True)
class VersionInfo:
    version: int
    status: str
    calling_ae_title: str | None
    received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    completion_reason: str | None
    instance_count: int
    outbox: OutboxInfo | None
    analyses: tuple[AnalysisInfo, ...]  # oldest first
    pruned_at: datetime | None = None  # source instances deleted from the spool (retention)
    prune_reason: str | None = None  # "retention" | "emergency"


@dataclass(frozen=True)
class AuditInfo:
    """An operator action on the study or one of its exports."""

    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any] | None


@dataclass(frozen=True)
class StudyDetail:
    study_instance_uid: str
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    created_at: datetime
    series: tuple[SeriesInfo, ...]
    versions: tuple[VersionInfo, ...]  # version 1 first
    audit: tuple[AuditInfo, ...] = ()  # oldest first
    patient_id: str | None = None
    patient_name: str | None = None

    @property
    def latest(self) -> VersionInfo | None:
        return self.versions[-1] if self.versions else None


@dataclass(frozen=True)
class ReasonCount:
    reason: str
    count: int


@dataclass(frozen=True)
class Turnaround:
    """Seconds from a version's completion to its report's delivery, one value per SR export."""

    count: int
    median_seconds: float | None
    p95_seconds: float | None
    max_seconds: float | None


@dataclass(frozen=True)
class Stats:
    since: datetime | None
    until: datetime | None
    study_versions: int
    by_status: dict[str, int]
    by_decision: dict[str, int]
    turnaround: Turnaround
    analysis_failures: tuple[ReasonCount, ...]  # most frequent first
    dead_exports: tuple[ReasonCount, ...]
    exports_by_state: dict[str, int]


@dataclass(frozen=True)
class ExportRow(ExportInfo):
    """An export in a listing, with the study it reports on."""

    study_instance_uid: str = ""
    accession_number: str | None = None
    version: int = 0


# --- helpers --------------------------------------------------------------------------


def iso_study_date(value: str | None) -> str | None:
    """DICOM DA ``YYYYMMDD`` as ``YYYY-MM-DD``; anything else is returned unchanged."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or None


def summarise_exports(states: Iterable[str]) -> str | None:
    """One word for an analysis' exports: the worst state wins (dead, pending, delivered)."""
    seen = set(states)
    if not seen:
        return None
    for state in (ExportState.DEAD, ExportState.PENDING):
        if state in seen:
            return str(state)
    return str(ExportState.DELIVERED) if seen == {ExportState.DELIVERED} else sorted(seen)[0]


def _period(
    column: Any, since: datetime | None, until: datetime | None
) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if since is not None:
        clauses.append(column >= since)
    if until is not None:
        clauses.append(column < until)
    return clauses


def _is_newest_version() -> ColumnElement[bool]:
    """No later version of the same study (an index probe on ``(study_id, version)``).

    An anti-join rather than a ``GROUP BY ... max()`` subquery joined back:
    with fresh statistics PostgreSQL planned that as a nested loop over every
    study (26 s to list 100 of 20,000 studies).
    """
    newer = aliased(StudyVersion)
    return ~exists().where(
        newer.study_id == StudyVersion.study_id, newer.version > StudyVersion.version
    )


def _is_newest_analysis() -> ColumnElement[bool]:
    """No later analysis of the same version (a requeue with a new model adds a newer one)."""
    newer = aliased(Analysis)
    return ~exists().where(
        newer.study_version_id == Analysis.study_version_id, newer.id > Analysis.id
    )


def _export_fields(row: Export) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "destination": row.destination,
        "sop_instance_uid": row.sop_instance_uid,
        "replaces_sop_instance_uid": row.replaces_sop_instance_uid,
        "state": row.state,
        "attempts": row.attempts,
        "last_status": row.last_status,
        "last_error": row.last_error,
        "created_at": row.created_at,
        "last_attempt_at": row.last_attempt_at,
        "next_attempt_at": row.next_attempt_at,
        "delivered_at": row.delivered_at,
    }


# --- studies --------------------------------------------------------------------------


def list_studies(
    session: Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    status: str | None = None,
    decision: str | None = None,
    calling_ae_title: str | None = None,
    limit: int | None = 100,
    include_phi: bool = False,
) -> list[StudyRow]:
    """Studies, newest first, each described by its newest version.

    ``since``/``until`` bound the time the newest version started arriving
    (``until`` exclusive); ``status`` is a version state, ``decision`` the
    newest analysis' study call.
    """
    stmt = (
        select(Study, StudyVersion, Analysis)
        .join(StudyVersion, StudyVersion.study_id == Study.id)
        .outerjoin(
            Analysis, (Analysis.study_version_id == StudyVersion.id) & _is_newest_analysis()
        )
        .where(_is_newest_version())
        .where(*_period(StudyVersion.first_received_at, since, until))
        .order_by(StudyVersion.first_received_at.desc(), Study.id.desc())
    )
    if status is not None:
        stmt = stmt.where(StudyVersion.state == status)
    if decision is not None:
        stmt = stmt.where(Analysis.decision == decision)
    if calling_ae_title is not None:
        stmt = stmt.where(StudyVersion.calling_ae_title == calling_ae_title.strip())
    if limit is not None:
        stmt = stmt.limit(limit)
    rows = session.execute(stmt).all()

    analysis_ids = [analysis.id for _, _, analysis in rows if analysis is not None]
    export_states: dict[int, list[str]] = defaultdict(list)
    if analysis_ids:
        for analysis_id, state in session.execute(
            select(Export.analysis_id, Export.state).where(Export.analysis_id.in_(analysis_ids))
        ):
            export_states[analysis_id].append(state)

    result = []
    for study, version, analysis in rows:
        result.append(
            StudyRow(
                study_instance_uid=study.study_instance_uid,
                accession_number=study.accession_number,
                study_date=iso_study_date(study.study_date),
                version=version.version,
                status=version.state,
                calling_ae_title=version.calling_ae_title,
                received_at=version.first_received_at,
                last_received_at=version.last_received_at,
                completed_at=version.completed_at,
                instance_count=version.instance_count,
                analysis_state=analysis.state if analysis else None,
                decision=analysis.decision if analysis else None,
                fraction_covid19=analysis.fraction_covid19 if analysis else None,
                model_name=analysis.model_name if analysis else None,
                model_version=analysis.model_version if analysis else None,
                report_state=summarise_exports(export_states[analysis.id]) if analysis else None,
                patient_id=study.patient_id if include_phi else None,
                patient_name=study.patient_name if include_phi else None,
            )
        )
    return result


def resolve_study(session: Session, key: str) -> str:
    """The Study Instance UID for ``key``: a UID, or an accession number naming one study.

    Tables on narrow terminals shorten UIDs but show the accession number, so
    operators may type either.
    """
    key = key.strip()
    uid = session.scalar(select(Study.study_instance_uid).where(Study.study_instance_uid == key))
    if uid is not None:
        return uid
    uids = list(
        session.scalars(
            select(Study.study_instance_uid)
            .where(Study.accession_number == key)
            .order_by(Study.id)
        )
    )
    if not uids:
        raise StudyNotFound(key)
    if len(uids) > 1:
        raise AmbiguousStudy(key, uids)
    return uids[0]


def _key_slices(session: Session, analysis_id: int, count: int) -> tuple[KeySlice, ...]:
    rows = session.execute(
        select(
            SliceResult.slice_index,
            SliceResult.sop_instance_uid,
            SliceResult.frame_number,
            SliceResult.position_z,
            SliceResult.p_covid19,
            SliceResult.predicted_class,
            SliceResult.manifestation,
        )
        .where(
            SliceResult.analysis_id == analysis_id,
            SliceResult.skipped.is_(False),
            SliceResult.p_covid19.is_not(None),
        )
        .order_by(SliceResult.p_covid19.desc(), SliceResult.slice_index)
        .limit(count)
    ).all()
    return tuple(
        KeySlice(
            slice_index=r.slice_index,
            sop_instance_uid=r.sop_instance_uid,
            frame_number=r.frame_number,
            position_z=r.position_z,
            p_covid19=float(r.p_covid19),
            predicted_class=r.predicted_class,
            manifestation=r.manifestation,
        )
        for r in rows
    )


def _analysis_info(session: Session, analysis: Analysis, key_slices: int) -> AnalysisInfo:
    exports = session.scalars(
        select(Export).where(Export.analysis_id == analysis.id).order_by(Export.id)
    )
    return AnalysisInfo(
        id=analysis.id,
        state=analysis.state,
        model_name=analysis.model_name,
        model_version=analysis.model_version,
        model_uid=analysis.model_uid,
        manifestation_model_uid=analysis.manifestation_model_uid,
        worker=analysis.worker,
        device=analysis.device,
        attempts=analysis.attempts,
        claimed_at=analysis.claimed_at,
        finished_at=analysis.finished_at,
        series_instance_uid=analysis.series_instance_uid,
        series_selection=analysis.series_selection,
        slices_total=analysis.slices_total,
        slices_analysed=analysis.slices_analysed,
        slices_skipped=analysis.slices_skipped,
        fraction_covid19=analysis.fraction_covid19,
        fraction_other_pneumonia=analysis.fraction_other_pneumonia,
        fraction_normal=analysis.fraction_normal,
        decision=analysis.decision,
        threshold=analysis.threshold,
        manifestation_counts=dict(analysis.manifestation_counts)
        if analysis.manifestation_counts is not None
        else None,
        timings=dict(analysis.timings) if analysis.timings is not None else None,
        failure_reason=analysis.failure_reason,
        report_problems=analysis.report_problems,
        key_slices=_key_slices(session, analysis.id, key_slices),
        exports=tuple(ExportInfo(**_export_fields(e)) for e in exports),
    )


def _audit_for(session: Session, uid: str, export_ids: Sequence[str]) -> tuple[AuditInfo, ...]:
    entries = session.scalars(
        select(AuditEntry)
        .where(
            ((AuditEntry.action.like("studies.%")) & (AuditEntry.target == uid))
            | ((AuditEntry.action.like("exports.%")) & (AuditEntry.target.in_(export_ids)))
        )
        .order_by(AuditEntry.at, AuditEntry.id)
    )
    return tuple(
        AuditInfo(
            at=e.at,
            actor=e.actor,
            action=e.action,
            target=e.target,
            detail=_json_object(e.detail),
        )
        for e in entries
    )


def _json_object(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return {"text": text}
    return value if isinstance(value, dict) else {"value": value}


def get_study(
    session: Session, key: str, *, include_phi: bool = False, key_slices: int = KEY_SLICES
) -> StudyDetail:
    """Everything known about one study (by UID or unique accession number).

    Raises :class:`StudyNotFound` or :class:`AmbiguousStudy`.
    """
    uid = resolve_study(session, key)
    study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()

    counts = dict(
        session.execute(
            select(Instance.series_id, func.count(Instance.id))
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study.id)
            .group_by(Instance.series_id)
        ).all()
    )
    series = tuple(
        SeriesInfo(
            series_instance_uid=s.series_instance_uid,
            modality=s.modality,
            series_number=s.series_number,
            series_description=s.series_description,
            instance_count=counts.get(s.id, 0),
        )
        for s in session.scalars(
            select(Series)
            .where(Series.study_id == study.id)
            .order_by(Series.series_number, Series.id)
        )
    )

    pruned = {
        row.study_version_id: row
        for row in session.execute(
            select(SpoolPrune.study_version_id, SpoolPrune.pruned_at, SpoolPrune.reason)
            .join(StudyVersion, StudyVersion.id == SpoolPrune.study_version_id)
            .where(StudyVersion.study_id == study.id, SpoolPrune.pruned_at.is_not(None))
        )
    }
    versions = []
    for version in session.scalars(
        select(StudyVersion).where(StudyVersion.study_id == study.id).order_by(StudyVersion.version)
    ):
        outbox = session.scalars(
            select(OutboxEntry).where(OutboxEntry.study_version_id == version.id)
        ).one_or_none()
        analyses = session.scalars(
            select(Analysis).where(Analysis.study_version_id == version.id).order_by(Analysis.id)
        )
        versions.append(
            VersionInfo(
                version=version.version,
                status=version.state,
                calling_ae_title=version.calling_ae_title,
                received_at=version.first_received_at,
                last_received_at=version.last_received_at,
                completed_at=version.completed_at,
                completion_reason=version.completion_reason,
                instance_count=version.instance_count,
                outbox=OutboxInfo(
                    created_at=outbox.created_at,
                    dispatched_at=outbox.dispatched_at,
                    attempts=outbox.attempts,
                    last_error=outbox.last_error,
                    next_attempt_at=outbox.next_attempt_at,
                )
                if outbox is not None
                else None,
                analyses=tuple(_analysis_info(session, a, key_slices) for a in analyses),
                pruned_at=pruned[version.id].pruned_at if version.id in pruned else None,
                prune_reason=pruned[version.id].reason if version.id in pruned else None,
            )
        )

    export_ids = [str(e.id) for v in versions for a in v.analyses for e in a.exports]
    return StudyDetail(
        audit=_audit_for(session, study.study_instance_uid, export_ids),
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        study_date=iso_study_date(study.study_date),
        study_description=study.study_description,
        created_at=study.created_at,
        series=series,
        versions=tuple(versions),
        patient_id=study.patient_id if include_phi else None,
        patient_name=study.patient_name if include_phi else None,
    )


# --- statistics -----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation, numpy's default); None when empty."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def turnaround(values: Sequence[float]) -> Turnaround:
    """Median, 95th percentile and maximum of turnaround times in seconds."""
    if not values:
        return Turnaround(count=0, median_seconds=None, p95_seconds=None, max_seconds=None)
    return Turnaround(
        count=len(values),
        median_seconds=float(statistics.median(values)),
        p95_seconds=percentile(values, 95),
        max_seconds=float(max(values)),
    )


def _reasons(values: Iterable[str | None]) -> tuple[ReasonCount, ...]:
    counter = Counter((v or "(no reason recorded)").strip() for v in values)
    ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))
    return tuple(ReasonCount(reason=reason, count=count) for reason, count in ranked)


def study_stats(
    session: Session, *, since: datetime | None = None, until: datetime | None = None
) -> Stats:
    """Counts, turnaround and failures over the study versions that started arriving in the period.

    Counts are per study version (the unit the pipeline processes); decisions
    and failures come from each version's newest analysis. Turnaround is one
    value per delivered SR export: ``delivered_at - study_versions.completed_at``.
    """
    in_period = [*_period(StudyVersion.first_received_at, since, until), not_test_version()]
    by_status = dict(
        session.execute(
            select(StudyVersion.state, func.count(StudyVersion.id))
            .where(*in_period)
            .group_by(StudyVersion.state)
        ).all()
    )

    newest = (
        select(Analysis.id, Analysis.state, Analysis.decision, Analysis.failure_reason)
        .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
        .where(_is_newest_analysis(), *in_period)
    )
    analyses = session.execute(newest).all()
    by_decision = Counter(
        a.decision for a in analyses if a.state == AnalysisState.ANALYSED and a.decision
    )
    failures = _reasons(a.failure_reason for a in analyses if a.state == AnalysisState.FAILED)

    exports_stmt = (
        select(Export.state, Export.kind, Export.last_error, Export.delivered_at,
               StudyVersion.completed_at)
        .join(Analysis, Analysis.id == Export.analysis_id)
        .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
        .where(*in_period)
    )
    exports = session.execute(exports_stmt).all()
    exports_by_state = Counter(str(e.state) for e in exports)
    durations = [
        (e.delivered_at - e.completed_at).total_seconds()
        for e in exports
        if e.kind == REPORT_KIND
        and e.state == ExportState.DELIVERED
        and e.delivered_at is not None
        and e.completed_at is not None
    ]
    dead = _reasons(e.last_error for e in exports if e.state == ExportState.DEAD)

    return Stats(
        since=since,
        until=until,
        study_versions=sum(by_status.values()),
        by_status={str(k): int(v) for k, v in sorted(by_status.items())},
        by_decision=dict(sorted(by_decision.items())),
        turnaround=turnaround(durations),
        analysis_failures=failures,
        dead_exports=dead,
        exports_by_state=dict(sorted(exports_by_state.items())),
    )


# --- exports --------------------------------------------------------------------------


def list_exports(
    session: Session,
    *,
    state: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    study_instance_uid: str | None = None,
    limit: int | None = 100,
) -> list[ExportRow]:
    """Report objects and their delivery state, newest first (``since``/``until`` on creation)."""
    stmt = (
        select(Export, Study.study_instance_uid, Study.accession_number, StudyVersion.version)
        .join(Analysis, Analysis.id == Export.analysis_id)
        .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(*_period(Export.created_at, since, until))
        .order_by(Export.created_at.desc(), Export.id.desc())
    )
    if state is not None:
        stmt = stmt.where(Export.state == state)
    if study_instance_uid is not None:
        stmt = stmt.where(Study.study_instance_uid == study_instance_uid)
    if limit is not None:
        stmt = stmt.limit(limit)
    rows = []
    for export, uid, accession, version in session.execute(stmt).all():
        rows.append(
            ExportRow(
                **_export_fields(export),
                study_instance_uid=uid,
                accession_number=accession,
                version=version,
            )
        )
    return rows
