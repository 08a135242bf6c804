"""Writing an analysis' outcome: results, or a failure an operator can read.

Every write is conditional on still holding the claim (``worker`` matches and
the row is ``running``), in the same transaction as the results: a worker that
lost its claim (it looked dead and was taken over) can never add a second set
of slice results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, insert, update
from sqlalchemy.orm import Session

from ctdx.db.models import Analysis, AnalysisState, SliceResult, StudyVersion, VersionState, utcnow
from ctdx.db.session import session_scope

logger = logging.getLogger(__name__)


class ClaimLost(RuntimeError):
    """Our claim was taken over while we worked; our results are discarded."""


@dataclass(frozen=True)
class SliceRow:
    """One slice's result, as stored in ``slice_results``."""

    sop_instance_uid: str
    slice_index: int
    position_z: float | None
    lung_area_mm2: float | None
    lung_fraction: float
    skipped: bool
    p_covid19: float | None = None
    p_other_pneumonia: float | None = None
    p_normal: float | None = None
    predicted_class: str | None = None
    p_ground_glass_opacity: float | None = None
    p_consolidation: float | None = None
    p_fibrotic_streaks: float | None = None
    manifestation: str | None = None
    frame_number: int | None = None  # 1-based frame of a multi-frame (Enhanced CT) instance


@dataclass(frozen=True)
class StudyResult:
    """Per-study fields of ``analyses`` written when the analysis succeeds."""

    series_instance_uid: str
    series_selection: str
    slices_total: int
    slices_analysed: int
    slices_skipped: int
    fraction_covid19: float
    fraction_other_pneumonia: float
    fraction_normal: float
    decision: str
    threshold: float
    manifestation_counts: Mapping[str, int] | None
    device: str
    operating_point_id: int | None = None  # the site's adopted operating point, if used


def _owned(session: Session, analysis_id: int, worker: str, values: Mapping[str, Any]) -> None:
    result = session.execute(
        update(Analysis)
        .where(
            Analysis.id == analysis_id,
            Analysis.worker == worker,
            Analysis.state == AnalysisState.RUNNING.value,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise ClaimLost(f"analysis {analysis_id} is no longer held by {worker}")


def _set_version_state(session: Session, study_version_id: int, state: VersionState) -> None:
    session.execute(
        update(StudyVersion).where(StudyVersion.id == study_version_id).values(state=state.value)
    )


def store_results(
    engine: Engine,
    analysis_id: int,
    worker: str,
    study_version_id: int,
    result: StudyResult,
    slices: list[SliceRow],
    timings: Mapping[str, float],
) -> float:
    """Store the analysis in one transaction; returns the seconds it took (the "database write")."""
    start = time.perf_counter()
    with session_scope(engine) as session:
        _owned(session, analysis_id, worker, {"heartbeat_at": utcnow()})
        session.execute(delete(SliceResult).where(SliceResult.analysis_id == analysis_id))
        if slices:
            session.execute(
                insert(SliceResult),
                [{"analysis_id": analysis_id, **row.__dict__} for row in slices],
            )
        write_seconds = time.perf_counter() - start
        values: dict[str, Any] = dict(result.__dict__)
        values["manifestation_counts"] = (
            dict(result.manifestation_counts) if result.manifestation_counts is not None else None
        )
        values.update(
            state=AnalysisState.ANALYSED.value,
            finished_at=utcnow(),
            failure_reason=None,
            timings={**timings, "database_write": round(write_seconds, 4)},
        )
        _owned(session, analysis_id, worker, values)
        _set_version_state(session, study_version_id, VersionState.ANALYSED)
    return time.perf_counter() - start


def record_timings(engine: Engine, analysis_id: int, stages: Mapping[str, float]) -> None:
    """Add stages timed after the results were stored (the reports) to the analysis' timings."""
    with session_scope(engine) as session:
        analysis = session.get(Analysis, analysis_id)
        if analysis is not None:
            analysis.timings = {**(analysis.timings or {}), **stages}


def store_failure(
    engine: Engine,
    analysis_id: int,
    worker: str,
    study_version_id: int,
    reason: str,
    series_instance_uid: str | None = None,
    series_selection: str | None = None,
    timings: Mapping[str, float] | None = None,
) -> None:
    """Mark the analysis and its study version ``failed`` with a reason an operator can act on."""
    with session_scope(engine) as session:
        _owned(
            session,
            analysis_id,
            worker,
            {
                "state": AnalysisState.FAILED.value,
                "failure_reason": reason,
                "finished_at": utcnow(),
                "series_instance_uid": series_instance_uid,
                "series_selection": series_selection,
                "timings": dict(timings) if timings else None,
            },
        )
        _set_version_state(session, study_version_id, VersionState.FAILED)
