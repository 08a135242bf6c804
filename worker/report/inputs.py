"""What a report is built from, read once from the database into frozen dataclasses.

The builders (:mod:`~worker.report.sr`, :mod:`~worker.report.summary`,
:mod:`~worker.report.ko`) take a :class:`ReportInput` and never touch the
session: ORM objects stay inside :func:`load_report_input`'s caller's scope.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ctdx.db.models import (
    Analysis,
    AnalysisState,
    Instance,
    Series,
    SliceResult,
    Study,
    StudyVersion,
)
from ctdx.db.validation_db import operating_point_statement
from ctdx.model_train.method.classes import MANIFESTATION_CLASSES, RECOGNITION_CLASSES
from ctdx.worker.report.errors import AnalysisNotReportable

logger = logging.getLogger(__name__)

#: Number of key slices: the most confident COVID-19 slices.
KEY_SLICES = 3


@dataclass(frozen=True)
class SliceInfo:
    """One slice of the analysed series and where its instance lies in the spool."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    path: str  # relative to the spool directory
    slice_index: int
    skipped: bool
    p_covid19: float | None
    predicted_class: str | None
    manifestation: str | None
    frame_number: int | None = None  # 1-based frame of an Enhanced CT instance; None: classic

    def label(self) -> str:
        """The image as a person finds it: SOP Instance UID, and the frame when multi-frame."""
        if self.frame_number is None:
            return self.sop_instance_uid
        return f"{self.sop_instance_uid} frame {self.frame_number}"


@dataclass(frozen=True)
class ReportInput:
    """An analysed study version, as the report states it."""

    analysis_id: int
    study_id: int
    study_instance_uid: str
    study_version: int
    series_instance_uid: str
    model_name: str
    model_version: str
    model_uid: str
    manifestation_model_uid: str | None
    decision: str
    threshold: float  # share of analysed slices, 0..1
    fractions: dict[str, float]  # recognition class -> share of analysed slices, 0..1
    slices_total: int
    slices_analysed: int
    slices_skipped: int
    finished_at: datetime
    slices: tuple[SliceInfo, ...]
    device: str | None = None  # what ran the networks, e.g. "cpu (2 threads), int8 x86 (...)"
    # the threshold's origin and the local validation it rests on (db.validation_db)
    operating_point: str | None = None

    @property
    def covid_slices(self) -> tuple[SliceInfo, ...]:
        return tuple(s for s in self.slices if not s.skipped and s.predicted_class == "covid19")

    @property
    def key_slices(self) -> tuple[SliceInfo, ...]:
        """Up to :data:`KEY_SLICES` COVID-19 slices, most confident first (ties: lower index)."""
        ranked = sorted(self.covid_slices, key=lambda s: (-(s.p_covid19 or 0.0), s.slice_index))
        return tuple(ranked[:KEY_SLICES])

    @property
    def manifestation_counts(self) -> dict[str, int] | None:
        """COVID-19 slices per manifestation; ``None`` when no manifestation model ran."""
        if self.manifestation_model_uid is None:
            return None
        counts: dict[str, int] = dict.fromkeys(MANIFESTATION_CLASSES, 0)
        for s in self.covid_slices:
            if s.manifestation in counts:
                counts[s.manifestation] += 1
        return counts

    @property
    def is_demo_model(self) -> bool:
        """The synthetic demonstration model, whose every output must say so."""
        name = self.model_name.lower()
        return "demo" in name or "synthetic" in name


def load_report_input(session: Session, analysis_id: int) -> ReportInput:
    """Read an analysed study version; :class:`AnalysisNotReportable` when there is no result."""
    analysis = session.get(Analysis, analysis_id)
    if analysis is None:
        raise AnalysisNotReportable(f"analysis {analysis_id} does not exist")
    if (
        analysis.state != AnalysisState.ANALYSED
        or analysis.decision not in RECOGNITION_CLASSES
        or analysis.threshold is None
    ):
        raise AnalysisNotReportable(
            f"analysis {analysis_id} is {analysis.state} with decision {analysis.decision!r} "
            f"and threshold {analysis.threshold!r}; only analysed studies with a call are reported"
        )
    version = session.get_one(StudyVersion, analysis.study_version_id)
    study = session.get_one(Study, version.study_id)
    rows = session.execute(
        select(SliceResult, Instance, Series)
        .join(Instance, Instance.sop_instance_uid == SliceResult.sop_instance_uid)
        .join(Series, Series.id == Instance.series_id)
        .where(SliceResult.analysis_id == analysis_id)
        .order_by(SliceResult.slice_index)
    ).all()
    slices = tuple(
        SliceInfo(
            sop_instance_uid=result.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            series_instance_uid=series.series_instance_uid,
            path=instance.path,
            slice_index=result.slice_index,
            skipped=result.skipped,
            p_covid19=result.p_covid19,
            predicted_class=result.predicted_class,
            manifestation=result.manifestation,
            frame_number=result.frame_number,
        )
        for result, instance, series in rows
    )
    if not slices:
        raise AnalysisNotReportable(f"analysis {analysis_id} has no slice results")
    analysed = [s for s in slices if not s.skipped]
    fractions = {
        "covid19": analysis.fraction_covid19,
        "other_pneumonia": analysis.fraction_other_pneumonia,
        "normal": analysis.fraction_normal,
    }
    shares = {
        name: value
        if value is not None
        else (sum(s.predicted_class == name for s in analysed) / len(analysed) if analysed else 0.0)
        for name, value in fractions.items()
    }
    finished_at = analysis.finished_at or analysis.heartbeat_at
    return ReportInput(
        analysis_id=analysis.id,
        study_id=study.id,
        study_instance_uid=study.study_instance_uid,
        study_version=version.version,
        series_instance_uid=analysis.series_instance_uid or slices[0].series_instance_uid,
        model_name=analysis.model_name,
        model_version=analysis.model_version,
        model_uid=analysis.model_uid,
        manifestation_model_uid=analysis.manifestation_model_uid,
        decision=str(analysis.decision),
        threshold=analysis.threshold,
        fractions=shares,
        slices_total=analysis.slices_total if analysis.slices_total is not None else len(slices),
        slices_analysed=(
            analysis.slices_analysed if analysis.slices_analysed is not None else len(analysed)
        ),
        slices_skipped=(
            analysis.slices_skipped
            if analysis.slices_skipped is not None
            else len(slices) - len(analysed)
        ),
        finished_at=finished_at,
        slices=slices,
        device=analysis.device,
        operating_point=operating_point_statement(session, analysis.id),
    )
