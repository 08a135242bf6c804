"""Rows as the listener, the worker and the report sender write them, through the ORM models.

Each function adds to a caller-owned session and flushes (so ids exist); the
caller commits. :func:`build_scenario` fills a database with the studies the
CLI tests ask about, at times relative to the local midnight of today, so
``--since today`` has a fixed answer whatever the hour the tests run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy.orm import Session

from ctdx.db.models import (
    Analysis,
    AnalysisState,
    Export,
    ExportState,
    Instance,
    OutboxEntry,
    Series,
    SliceResult,
    Study,
    StudyVersion,
    VersionState,
)

MODEL_NAME = "ctdx-resnet50-test"
MODEL_VERSION = "1.0.0"
PACS = "PACS@127.0.0.1:11112"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def uid(name: str) -> str:
    """A long, valid, reproducible UID (as a scanner would send: ~60 characters)."""
    return str(generate_uid(entropy_srcs=[name]))


def add_study(
    session: Session,
    name: str,
    *,
    accession_number: str | None,
    patient_id: str | None = None,
    patient_name: str | None = None,
    study_date: str | None = "20260501",
    study_description: str | None = "CT CHEST",
    created_at: datetime,
) -> Study:
    study = Study(
        study_instance_uid=uid(f"study/{name}"),
        accession_number=accession_number,
        patient_id=patient_id,
        patient_name=patient_name,
        study_date=study_date,
        study_description=study_description,
        created_at=created_at,
    )
    session.add(study)
    session.flush()
    return study


def add_version(
    session: Session,
    study: Study,
    *,
    version: int = 1,
    state: VersionState,
    calling_ae_title: str | None,
    received_at: datetime,
    instance_count: int = 12,
    completed_at: datetime | None = None,
    outbox: bool = True,
    dispatched: bool = True,
) -> StudyVersion:
    """A version whose instances arrived over 30 s from ``received_at``."""
    last = received_at + timedelta(seconds=30)
    row = StudyVersion(
        study_id=study.id,
        version=version,
        state=state,
        calling_ae_title=calling_ae_title,
        first_received_at=received_at,
        last_received_at=last,
        completed_at=completed_at
        if completed_at is not None or state == VersionState.RECEIVING
        else last + timedelta(seconds=30),
        completion_reason=None if state == VersionState.RECEIVING else "quiet",
        instance_count=instance_count,
    )
    session.add(row)
    session.flush()
    if outbox and state != VersionState.RECEIVING:
        assert row.completed_at is not None
        session.add(
            OutboxEntry(
                study_version_id=row.id,
                created_at=row.completed_at,
                dispatched_at=row.completed_at + timedelta(seconds=1) if dispatched else None,
                attempts=1 if dispatched else 0,
                next_attempt_at=row.completed_at,
            )
        )
        session.flush()
    return row


def add_series(
    session: Session, study: Study, version: StudyVersion, name: str, *, instances: int
) -> Series:
    series = Series(
        study_id=study.id,
        series_instance_uid=uid(f"series/{name}"),
        modality="CT",
        series_number=2,
        series_description="LUNG 1.25mm",
        created_at=version.first_received_at,
    )
    session.add(series)
    session.flush()
    for i in range(instances):
        session.add(
            Instance(
                series_id=series.id,
                study_version_id=version.id,
                sop_instance_uid=uid(f"instance/{name}/{i}"),
                sop_class_uid=CT_IMAGE_STORAGE,
                transfer_syntax_uid=EXPLICIT_VR_LE,
                path=f"{name}/{i}.dcm",
                size_bytes=526_000,
                sha256="0" * 64,
                calling_ae_title=version.calling_ae_title,
                received_at=version.first_received_at,
            )
        )
    session.flush()
    return series


def add_analysis(
    session: Session,
    version: StudyVersion,
    *,
    state: AnalysisState = AnalysisState.ANALYSED,
    decision: str | None = None,
    fractions: tuple[float, float, float] | None = None,
    series: Series | None = None,
    p_covid: Sequence[float] = (),
    skipped: int = 0,
    failure_reason: str | None = None,
    model_uid: str | None = None,
    manifestation_counts: dict[str, int] | None = None,
    frames: bool = False,
) -> Analysis:
    """An analysis; one slice row per ``p_covid`` value (plus ``skipped`` skipped slices).

    ``frames``: the slices are frames 1..N of one multi-frame (Enhanced CT) instance.
    """
    assert version.completed_at is not None
    claimed = version.completed_at + timedelta(seconds=2)
    finished = claimed + timedelta(seconds=8)
    analysis = Analysis(
        study_version_id=version.id,
        state=state,
        model_name=MODEL_NAME,
        model_version=MODEL_VERSION,
        model_uid=model_uid or uid("model/resnet50"),
        manifestation_model_uid=uid("model/resnet18"),
        worker="gpu-node-1:4242/abc",
        device="cuda:0",
        attempts=1,
        claimed_at=claimed,
        heartbeat_at=finished,
        finished_at=None if state == AnalysisState.RUNNING else finished,
        series_instance_uid=series.series_instance_uid if series else None,
        series_selection="most slices; lung kernel" if series else None,
        slices_total=len(p_covid) + skipped if state == AnalysisState.ANALYSED else None,
        slices_analysed=len(p_covid) if state == AnalysisState.ANALYSED else None,
        slices_skipped=skipped if state == AnalysisState.ANALYSED else None,
        fraction_covid19=fractions[0] if fractions else None,
        fraction_other_pneumonia=fractions[1] if fractions else None,
        fraction_normal=fractions[2] if fractions else None,
        decision=decision,
        threshold=0.05 if decision else None,
        manifestation_counts=manifestation_counts,
        timings={"decode": 1.25, "segmentation": 3.5, "classification": 7.0}
        if state == AnalysisState.ANALYSED
        else None,
        failure_reason=failure_reason,
    )
    session.add(analysis)
    session.flush()
    sop_prefix = f"slice/{version.id}/{analysis.id}"
    for index, p in enumerate(p_covid):
        rest = (1.0 - p) / 2
        session.add(
            SliceResult(
                analysis_id=analysis.id,
                sop_instance_uid=uid(sop_prefix if frames else f"{sop_prefix}/{index}"),
                frame_number=index + 1 if frames else None,
                slice_index=index,
                position_z=-100.0 + 2.5 * index,
                lung_area_mm2=15000.0,
                lung_fraction=0.3,
                skipped=False,
                p_covid19=p,
                p_other_pneumonia=rest,
                p_normal=rest,
                predicted_class="covid19" if p > 0.5 else "normal",
                p_ground_glass_opacity=0.7 if p > 0.5 else None,
                p_consolidation=0.2 if p > 0.5 else None,
                p_fibrotic_streaks=0.1 if p > 0.5 else None,
                manifestation="ground_glass_opacity" if p > 0.5 else None,
            )
        )
    for k in range(skipped):
        session.add(
            SliceResult(
                analysis_id=analysis.id,
                sop_instance_uid=uid(f"{sop_prefix}/skipped/{k}"),
                slice_index=len(p_covid) + k,
                position_z=None,
                lung_fraction=0.001,
                skipped=True,
            )
        )
    session.flush()
    return analysis


def add_export(
    session: Session,
    analysis: Analysis,
    *,
    state: ExportState,
    kind: str = "sr",
    attempts: int = 1,
    delivered_after: timedelta | None = None,
    last_error: str | None = None,
    last_status: int | None = None,
    destination: str = PACS,
) -> Export:
    """An export created when the analysis finished; ``delivered_after`` counts from completion."""
    assert analysis.finished_at is not None
    version = session.get(StudyVersion, analysis.study_version_id)
    assert version is not None and version.completed_at is not None
    delivered_at = (
        version.completed_at + delivered_after
        if state == ExportState.DELIVERED and delivered_after is not None
        else None
    )
    export = Export(
        analysis_id=analysis.id,
        kind=kind,
        destination=destination,
        sop_instance_uid=uid(f"{kind}/{analysis.id}/{destination}"),
        path=f"reports/{analysis.id}.{kind}.dcm",
        state=state,
        attempts=attempts,
        last_error=last_error,
        last_status=last_status,
        created_at=analysis.finished_at,
        last_attempt_at=delivered_at or analysis.finished_at,
        next_attempt_at=analysis.finished_at + timedelta(minutes=attempts),
        delivered_at=delivered_at,
    )
    session.add(export)
    session.flush()
    return export


# --- the scenario the CLI tests ask about ---------------------------------------------


@dataclass
class Scenario:
    """What :func:`build_scenario` wrote: names -> UIDs, export ids, times."""

    now: datetime
    today: datetime  # local midnight, as UTC
    uids: dict[str, str] = field(default_factory=dict)
    accession: dict[str, str | None] = field(default_factory=dict)
    exports: dict[str, int] = field(default_factory=dict)
    key_slice_p: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def local_midnight(now: datetime) -> datetime:
    return datetime.combine(now.astimezone().date(), time()).astimezone().astimezone(UTC)


def build_scenario(session: Session, now: datetime | None = None) -> Scenario:
    """Six studies covering every state the CLI reports.

    Today (local): ``covid`` (analysed, covid19, SR delivered after 12 s),
    ``dead`` (normal, SR dead, SC delivered), ``receiving`` (still arriving),
    ``requeued`` (version 2 queued; version 1 analysed covid19 four days ago,
    SR delivered after 30 s). Yesterday: ``pneumonia`` (other_pneumonia, SR
    pending). Three days ago: ``failed`` (no accession number, analysis failed).
    """
    now = now or datetime.now(UTC)
    today = local_midnight(now)
    span = now - today

    def at_today(share: float) -> datetime:
        return today + span * share

    sc = Scenario(now=now, today=today)

    # -- covid: analysed today, SR delivered 12 s after completion
    study = add_study(session, "covid", accession_number="ACC-COVID", patient_id="PID-0001",
                      patient_name="DOE^JANE", created_at=at_today(0.2))
    version = add_version(session, study, state=VersionState.ANALYSED,
                          calling_ae_title="CT_SCANNER_01", received_at=at_today(0.2))
    series = add_series(session, study, version, "covid", instances=4)
    p = [0.99, 0.97, 0.91, 0.85, 0.62, 0.30, 0.10, 0.05, 0.02, 0.01]
    analysis = add_analysis(
        session, version, decision="covid19", fractions=(0.5, 0.1, 0.4), series=series,
        p_covid=p, skipped=2,
        manifestation_counts={"ground_glass_opacity": 4, "consolidation": 1,
                              "fibrotic_streaks": 0},
    )
    sc.exports["covid"] = add_export(session, analysis, state=ExportState.DELIVERED,
                                     delivered_after=timedelta(seconds=12)).id
    sc.key_slice_p = sorted(p, reverse=True)
    sc.extra["covid_series_uid"] = series.series_instance_uid

    # -- dead: analysed normal today; SR dead after 8 attempts, SC delivered
    study_d = add_study(session, "dead", accession_number="ACC-DEAD", patient_id="PID-0002",
                        patient_name="ROE^RICHARD", created_at=at_today(0.4))
    version = add_version(session, study_d, state=VersionState.ANALYSED, calling_ae_title="CT02",
                          received_at=at_today(0.4))
    analysis = add_analysis(session, version, decision="normal", fractions=(0.01, 0.04, 0.95),
                            p_covid=[0.01, 0.02, 0.03])
    sc.exports["dead"] = add_export(
        session, analysis, state=ExportState.DEAD, attempts=8,
        last_error="association rejected: called AE title not recognised",
    ).id
    sc.exports["dead_sc"] = add_export(session, analysis, state=ExportState.DELIVERED, kind="sc",
                                       delivered_after=timedelta(seconds=20)).id

    # -- receiving: instances still arriving today
    study_r = add_study(session, "receiving", accession_number="ACC-RECV", patient_id="PID-0003",
                        patient_name="POE^EDGAR", created_at=at_today(0.6))
    add_version(session, study_r, state=VersionState.RECEIVING, calling_ae_title="CT_SCANNER_01",
                received_at=at_today(0.6))

    # -- requeued: version 1 four days ago (covid19, delivered after 30 s), version 2 queued today
    study_q = add_study(session, "requeued", accession_number="ACC-V2", patient_id="PID-0004",
                        patient_name="DOE^JOHN", created_at=today - timedelta(days=4))
    v1 = add_version(session, study_q, state=VersionState.ANALYSED, calling_ae_title="CT02",
                     received_at=today - timedelta(days=4))
    analysis = add_analysis(session, v1, decision="covid19", fractions=(0.2, 0.1, 0.7),
                            p_covid=[0.9, 0.1])
    sc.exports["v1"] = add_export(session, analysis, state=ExportState.DELIVERED,
                                  delivered_after=timedelta(seconds=30)).id
    add_version(session, study_q, version=2, state=VersionState.QUEUED, calling_ae_title="CT02",
                received_at=at_today(0.8))

    # -- pneumonia: yesterday, SR pending after a refused association
    study_p = add_study(session, "pneumonia", accession_number="ACC-PNEU", patient_id="PID-0005",
                        patient_name="DOE^ALEX", created_at=today - timedelta(hours=12))
    version = add_version(session, study_p, state=VersionState.ANALYSED, calling_ae_title="CT01",
                          received_at=today - timedelta(hours=12))
    analysis = add_analysis(session, version, decision="other_pneumonia",
                            fractions=(0.03, 0.6, 0.37), p_covid=[0.2, 0.03])
    sc.exports["pending"] = add_export(session, analysis, state=ExportState.PENDING, attempts=2,
                                       last_error="connection refused", last_status=None).id

    # -- failed: three days ago, no accession number
    study_f = add_study(session, "failed", accession_number=None, patient_id="PID-0006",
                        patient_name="DOE^SAM", created_at=today - timedelta(days=3))
    version = add_version(session, study_f, state=VersionState.FAILED, calling_ae_title="CT01",
                          received_at=today - timedelta(days=3))
    add_analysis(session, version, state=AnalysisState.FAILED,
                 failure_reason="no usable CT series: no axial CT series with 20 slices or more")

    for name, st in (("covid", study), ("dead", study_d), ("receiving", study_r),
                     ("requeued", study_q), ("pneumonia", study_p), ("failed", study_f)):
        sc.uids[name] = st.study_instance_uid
        sc.accession[name] = st.accession_number
    return sc
