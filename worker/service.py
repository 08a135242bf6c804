"""One study version from claim to report: the worker's logic as a plain function.

Reads like the diagram: claim -> select series -> order slices -> analyse
(:mod:`ctdx.worker.pipeline`) -> store -> publish reports. Celery is not needed to
call it (the embedded mode and the tests call it directly); ``ctdx.worker.tasks``
only translates its outcome into broker actions.

Errors:

- :class:`~worker.errors.AnalysisError` (no usable series, undecodable pixel
  data): the analysis and the study version become ``failed`` with the
  message as reason. Not raised further: the task is done.
- transient errors (database or broker unreachable): the claim is released
  and the error propagates, so the task is retried.
- anything else (a bug, the soft time limit, memory): recorded as a failure
  with the exception type, kept for an operator, and logged with traceback;
  retrying the same code on the same data would fail the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from ctdx.db.models import StudyVersion, utcnow
from ctdx.db.session import session_scope
from ctdx.db.settings import Settings
from ctdx.db.validation_db import StudyThreshold, study_threshold
from ctdx.worker import claim as claims
from ctdx.worker import metrics as worker_metrics
from ctdx.worker.errors import TRANSIENT_ERRORS, AnalysisError
from ctdx.worker.loading import order_series
from ctdx.worker.series_selection import Selection, load_rules, select_series
from ctdx.worker.store import ClaimLost, record_timings, store_failure, store_results
from ctdx.worker.study import StudyVersionNotFound, load_study_version

if TYPE_CHECKING:
    from ctdx.worker.runtime import Models

logger = logging.getLogger(__name__)


class Outcome(StrEnum):
    ANALYSED = "analysed"
    FAILED = "failed"  # permanent; reason stored
    ALREADY_DONE = "already_done"  # analysed or failed before with this model
    BUSY = "busy"  # a live worker holds the claim
    LOST = "lost"  # our claim was taken over mid-way; results discarded
    MISSING = "missing"  # no such study version


@dataclass(frozen=True)
class ProcessResult:
    outcome: Outcome
    study_version_id: int
    analysis_id: int | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe form (the task's return value)."""
        return {**asdict(self), "outcome": self.outcome.value}


def process_study_version(
    engine: Engine,
    settings: Settings,
    models: Models,
    study_version_id: int,
    worker: str | None = None,
) -> ProcessResult:
    """Analyse ``study_version_id`` unless it is done or held; idempotent."""
    worker_metrics.observe_model(models)
    result = _process_study_version(engine, settings, models, study_version_id, worker)
    worker_metrics.observe_analysis(result.outcome.value)
    return result


def _process_study_version(
    engine: Engine,
    settings: Settings,
    models: Models,
    study_version_id: int,
    worker: str | None,
) -> ProcessResult:
    worker = worker or claims.new_worker_identity()
    try:
        with session_scope(engine) as session:
            study = load_study_version(session, study_version_id, settings.spool_dir)
    except StudyVersionNotFound:
        logger.error("study version %d does not exist; nothing to analyse", study_version_id)
        return ProcessResult(Outcome.MISSING, study_version_id)

    got = claims.claim(engine, study_version_id, models.identity, worker, settings.claim_timeout)
    if got.status is claims.ClaimStatus.DONE:
        return ProcessResult(Outcome.ALREADY_DONE, study_version_id, got.analysis_id)
    if got.status is claims.ClaimStatus.BUSY:
        return ProcessResult(Outcome.BUSY, study_version_id, got.analysis_id, got.worker or "")
    assert got.analysis_id is not None
    analysis_id = got.analysis_id
    _observe_queue_wait(engine, study_version_id)

    selection: Selection | None = None
    timings: dict[str, float] = {}
    keeper = claims.ClaimKeeper(engine, analysis_id, worker, interval=settings.claim_timeout / 4)
    try:
        with keeper:
            start = time.perf_counter()
            selection = select_series(study.series, load_rules(settings.series_rules))
            series = order_series(selection.series.instances)
            timings["selection_and_headers"] = round(time.perf_counter() - start, 4)
            from ctdx.worker.pipeline import analyse_series  # torch: not at import

            point = _threshold(engine, settings, models)
            analysed = analyse_series(
                series, models, settings.model_copy(update={"covid_threshold": point.threshold})
            )
            timings.update(analysed.timings)
            worker_metrics.observe_stages(timings)
            if keeper.lost.is_set():
                raise ClaimLost(f"analysis {analysis_id} was taken over while running")
            store_results(
                engine, analysis_id, worker, study_version_id,
                replace(analysed.study_result(selection),
                        operating_point_id=point.operating_point_id),
                analysed.slice_rows(), timings,
            )
    except ClaimLost as exc:
        logger.error("study version %d: %s; results discarded", study_version_id, exc)
        return ProcessResult(Outcome.LOST, study_version_id, analysis_id, str(exc))
    except AnalysisError as exc:
        return _fail(engine, analysis_id, worker, study_version_id, str(exc), selection, timings)
    except TRANSIENT_ERRORS:
        logger.warning("study version %d: transient error; releasing the claim for the retry",
                       study_version_id, exc_info=True)
        try:
            claims.release(engine, analysis_id, worker)
        except Exception:  # the database may still be down: the claim then goes stale instead
            logger.warning("could not release analysis %d", analysis_id, exc_info=True)
        raise
    except SoftTimeLimitExceeded:
        reason = f"analysis exceeded the time limit ({settings.task_time_limit} s)"
        return _fail(engine, analysis_id, worker, study_version_id, reason, selection, timings)
    except Exception as exc:
        logger.exception("study version %d: unexpected error", study_version_id)
        reason = f"internal error ({type(exc).__name__}: {exc}); see the worker log"
        return _fail(engine, analysis_id, worker, study_version_id, reason, selection, timings)

    logger.info("study version %d: analysed (analysis %d, %s)", study_version_id, analysis_id,
                analysed.decision_label)
    _publish(engine, analysis_id, settings)
    return ProcessResult(Outcome.ANALYSED, study_version_id, analysis_id, analysed.decision_label)


def _threshold(engine: Engine, settings: Settings, models: Models) -> StudyThreshold:
    """The site's adopted operating point for the model; CTDX_COVID_THRESHOLD overrides it."""
    with session_scope(engine) as session:
        return study_threshold(session, models.identity.model_uid, settings.covid_threshold,
                               "covid_threshold" in settings.model_fields_set)


def _observe_queue_wait(engine: Engine, study_version_id: int) -> None:
    """Completion to claim, for ``ctdx_queue_wait_seconds`` (metrics never fail a study)."""
    try:
        with session_scope(engine) as session:
            completed = session.scalar(
                select(StudyVersion.completed_at).where(StudyVersion.id == study_version_id)
            )
    except SQLAlchemyError:
        return
    if completed is not None:
        worker_metrics.observe_queue_wait((utcnow() - completed).total_seconds())


def _fail(
    engine: Engine,
    analysis_id: int,
    worker: str,
    study_version_id: int,
    reason: str,
    selection: Selection | None,
    timings: dict[str, float],
) -> ProcessResult:
    logger.warning("study version %d failed: %s", study_version_id, reason)
    try:
        store_failure(
            engine, analysis_id, worker, study_version_id, reason,
            series_instance_uid=selection.series.series_instance_uid if selection else None,
            series_selection=selection.reason if selection else None,
            timings=timings,
        )
    except ClaimLost as exc:
        logger.error("study version %d: %s; failure not recorded", study_version_id, exc)
        return ProcessResult(Outcome.LOST, study_version_id, analysis_id, str(exc))
    return ProcessResult(Outcome.FAILED, study_version_id, analysis_id, reason)


def _publish(engine: Engine, analysis_id: int, settings: Settings) -> None:
    """Reports never fail an analysis: they are retried from their own outbox.

    Their time (build, validation, durable write, first delivery attempt) is the
    analysis's ``reports`` stage, added to its timings once they are published.
    """
    start = time.perf_counter()
    try:
        from ctdx.worker.report import publish_reports

        publish_reports(engine, analysis_id, settings)
    except Exception:
        logger.exception("analysis %d: publishing reports failed (the analysis stands)",
                         analysis_id)
        return
    stage = {"reports": round(time.perf_counter() - start, 4)}
    worker_metrics.observe_stages(stage)
    try:
        record_timings(engine, analysis_id, stage)
    except SQLAlchemyError:  # a timing is never worth failing or retrying a study for
        logger.warning("analysis %d: reports stage time not recorded", analysis_id,
                       exc_info=True)
