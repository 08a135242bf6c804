"""The worker's logic in-process (no broker): results, idempotency, failures, the task's edge."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import OperationalError

from ctdx.db.models import Analysis, AnalysisState, SliceResult, StudyVersion, VersionState
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings
from ctdx.model_train.method.classes import MANIFESTATION_CLASSES
from ctdx.model_train.phantom import write_phantom_series
from ctdx.worker import claim as claims
from ctdx.worker import runtime, service
from ctdx.worker.service import Outcome
from tests.worker.conftest import Checkpoints, StoredStudy, analysis_settings

N_SLICES, SIZE = 8, 80


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str, checkpoints: Checkpoints,
             small_rules: Path) -> Settings:
    """SQLite; the claim and result paths also run on PostgreSQL (``both_settings``)."""
    return analysis_settings(tmp_path / "data", sqlite_url, checkpoints, small_rules)


@pytest.fixture
def both_settings(tmp_path: Path, db_url: str, checkpoints: Checkpoints,
                  small_rules: Path) -> Settings:
    return analysis_settings(tmp_path / "data", db_url, checkpoints, small_rules)


@pytest.fixture
def db(settings: Settings) -> Engine:
    eng = make_engine(settings.resolved_database_url)
    yield eng  # type: ignore[misc]
    eng.dispose()


def _phantom(tmp_path: Path, store: Callable[..., StoredStudy], url: str, **kw: Any) -> StoredStudy:
    study = write_phantom_series(tmp_path / "src", "covid19", n_slices=N_SLICES, size=SIZE,
                                 seed=2, **kw)
    return store(url, list(study.paths))


def _run(db: Engine, settings: Settings, version_id: int) -> service.ProcessResult:
    return service.process_study_version(db, settings, runtime.get_models(settings), version_id)


def _analyses(db: Engine, version_id: int) -> list[Analysis]:
    with session_scope(db) as session:
        return list(session.scalars(select(Analysis).where(
            Analysis.study_version_id == version_id)))


def _version_state(db: Engine, version_id: int) -> str:
    with session_scope(db) as session:
        return str(session.scalar(select(StudyVersion.state).where(StudyVersion.id == version_id)))


def test_study_is_analysed_once_with_every_result_field(
    tmp_path: Path, both_settings: Settings, store: Callable[..., StoredStudy]
) -> None:
    settings = both_settings
    db = make_engine(settings.resolved_database_url)
    stored = _phantom(tmp_path, store, settings.resolved_database_url)
    first = _run(db, settings, stored.study_version_id)
    assert first.outcome is Outcome.ANALYSED
    with session_scope(db) as session:  # as after `ctdx studies requeue` of a finished study
        session.execute(update(StudyVersion).where(StudyVersion.id == stored.study_version_id)
                        .values(state="queued"))
    again = _run(db, settings, stored.study_version_id)  # a redelivered / duplicated task
    assert again.outcome is Outcome.ALREADY_DONE and again.analysis_id == first.analysis_id
    assert _version_state(db, stored.study_version_id) == "analysed"  # not left "queued"

    [analysis] = _analyses(db, stored.study_version_id)
    assert analysis.state == AnalysisState.ANALYSED and analysis.failure_reason is None
    assert analysis.series_instance_uid == stored.series_instance_uids[0]
    assert analysis.series_selection and analysis.series_selection.startswith("analysed series 2")
    assert analysis.slices_total == N_SLICES
    assert analysis.slices_analysed is not None and analysis.slices_skipped is not None
    assert analysis.slices_analysed + analysis.slices_skipped == N_SLICES
    assert analysis.slices_analysed >= N_SLICES // 2
    fractions = (analysis.fraction_covid19, analysis.fraction_other_pneumonia,
                 analysis.fraction_normal)
    assert sum(f or 0.0 for f in fractions) == pytest.approx(1.0)
    # the biased test head calls every analysed slice COVID-19
    assert analysis.fraction_covid19 == 1.0 and analysis.decision == "covid19"
    assert analysis.threshold == settings.covid_threshold
    assert analysis.manifestation_counts is not None
    assert set(analysis.manifestation_counts) == set(MANIFESTATION_CLASSES)
    assert sum(analysis.manifestation_counts.values()) == analysis.slices_analysed
    assert analysis.model_name == "test-recognition" and analysis.model_version == "0.0.1"
    models = runtime.get_models(settings)
    assert analysis.model_uid == models.identity.model_uid
    assert analysis.manifestation_model_uid == models.identity.manifestation_model_uid
    assert analysis.device and analysis.device.startswith("cpu")
    assert analysis.timings is not None
    for stage in ("decode", "segmentation", "preprocessing", "classification", "manifestation",
                  "database_write", "reports"):  # reports: added once they are published
        assert analysis.timings[stage] >= 0.0, stage
    assert analysis.finished_at is not None and analysis.attempts == 1
    assert _version_state(db, stored.study_version_id) == VersionState.ANALYSED

    with session_scope(db) as session:
        rows = list(session.scalars(select(SliceResult).where(
            SliceResult.analysis_id == analysis.id).order_by(SliceResult.slice_index)))
    assert len(rows) == N_SLICES
    assert {r.sop_instance_uid for r in rows} == set(stored.sop_instance_uids)
    positions = [r.position_z for r in rows]
    assert positions == sorted(positions)  # index follows position
    for row in rows:
        assert row.lung_area_mm2 is not None and row.lung_fraction >= 0
        if row.skipped:
            assert row.p_covid19 is None and row.predicted_class is None
        else:
            total = (row.p_covid19 or 0) + (row.p_other_pneumonia or 0) + (row.p_normal or 0)
            assert total == pytest.approx(1.0, abs=1e-4)
            assert row.predicted_class == "covid19" and row.manifestation in MANIFESTATION_CLASSES
    db.dispose()


def test_slices_with_too_little_lung_are_skipped_and_counted(
    tmp_path: Path, settings: Settings, db: Engine, store: Callable[..., StoredStudy]
) -> None:
    stored = _phantom(tmp_path, store, settings.resolved_database_url)
    strict = settings.model_copy(update={"min_lung_fraction": 0.12})
    assert _run(db, strict, stored.study_version_id).outcome is Outcome.ANALYSED
    [analysis] = _analyses(db, stored.study_version_id)
    with session_scope(db) as session:
        rows = list(session.scalars(select(SliceResult).where(
            SliceResult.analysis_id == analysis.id)))
    skipped = [r for r in rows if r.skipped]
    assert 0 < len(skipped) < N_SLICES and analysis.slices_skipped == len(skipped)
    assert all(r.lung_fraction < 0.12 and r.p_covid19 is None for r in skipped)
    assert all(r.lung_fraction >= 0.12 for r in rows if not r.skipped)

    everything = settings.model_copy(update={"min_lung_fraction": 1.0})
    other = _phantom(tmp_path / "b", store, settings.resolved_database_url)
    result = _run(db, everything, other.study_version_id)
    assert result.outcome is Outcome.FAILED and "no slice shows enough lung" in result.detail


def test_study_without_ct_series_fails_with_a_reason(
    tmp_path: Path, settings: Settings, db: Engine, store: Callable[..., StoredStudy]
) -> None:
    study = write_phantom_series(tmp_path / "src", "normal", n_slices=6, size=32, seed=0)
    for path in study.paths:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    stored = store(settings.resolved_database_url, list(study.paths))
    result = _run(db, settings, stored.study_version_id)
    assert result.outcome is Outcome.FAILED
    [analysis] = _analyses(db, stored.study_version_id)
    assert analysis.state == AnalysisState.FAILED
    assert analysis.failure_reason and analysis.failure_reason.startswith("no usable CT series")
    assert "modality MR not in ['CT']" in analysis.failure_reason
    assert _version_state(db, stored.study_version_id) == VersionState.FAILED
    # kept for an operator: a redelivery does not retry it
    assert _run(db, settings, stored.study_version_id).outcome is Outcome.ALREADY_DONE


def test_corrupt_pixel_data_fails_naming_the_instance(
    tmp_path: Path, settings: Settings, db: Engine, store: Callable[..., StoredStudy]
) -> None:
    study = write_phantom_series(tmp_path / "src", "normal", n_slices=6, size=32, seed=0)
    bad = pydicom.dcmread(study.paths[3])
    bad.PixelData = bad.PixelData[:100]
    bad.save_as(study.paths[3])
    stored = store(settings.resolved_database_url, list(study.paths))
    result = _run(db, settings, stored.study_version_id)
    assert result.outcome is Outcome.FAILED
    [analysis] = _analyses(db, stored.study_version_id)
    assert analysis.failure_reason is not None
    assert f"cannot decode pixel data of SOP Instance {study.sop_instance_uids[3]}" in \
        analysis.failure_reason
    assert analysis.series_instance_uid == study.series_instance_uid
    with session_scope(db) as session:
        assert session.scalar(select(func.count()).select_from(SliceResult)) == 0
    assert _version_state(db, stored.study_version_id) == VersionState.FAILED


def test_reporting_errors_do_not_fail_the_analysis(
    tmp_path: Path, settings: Settings, db: Engine, store: Callable[..., StoredStudy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ctdx.worker.report

    calls: list[int] = []

    def broken(engine: Engine, analysis_id: int, settings: Settings) -> None:
        calls.append(analysis_id)
        raise RuntimeError("PACS export exploded")

    monkeypatch.setattr(ctdx.worker.report, "publish_reports", broken)
    stored = _phantom(tmp_path, store, settings.resolved_database_url)
    result = _run(db, settings, stored.study_version_id)
    assert result.outcome is Outcome.ANALYSED and calls == [result.analysis_id]
    assert _version_state(db, stored.study_version_id) == VersionState.ANALYSED


def test_transient_error_releases_the_claim_for_the_retry(
    tmp_path: Path, settings: Settings, db: Engine, store: Callable[..., StoredStudy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ctdx.worker.pipeline

    stored = _phantom(tmp_path, store, settings.resolved_database_url)

    def unreachable(*args: object, **kwargs: object) -> None:
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    monkeypatch.setattr(ctdx.worker.pipeline, "analyse_series", unreachable)
    with pytest.raises(OperationalError):
        _run(db, settings, stored.study_version_id)
    retry = claims.claim(db, stored.study_version_id, runtime.get_models(settings).identity,
                         "retry:1/x", settings.claim_timeout)
    assert retry.status is claims.ClaimStatus.CLAIMED and retry.attempts == 2


def test_missing_study_version_is_logged_and_dropped(settings: Settings, db: Engine) -> None:
    assert _run(db, settings, 987654).outcome is Outcome.MISSING
    assert _analyses(db, 987654) == []
