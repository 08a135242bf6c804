"""The Celery edge: task options, broker timeouts, in-process execution (``apply``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ctdx.db.broker import QUEUE, TASK_PROCESS_STUDY, broker_config, visibility_timeout
from ctdx.db.models import Analysis
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings, load_settings
from ctdx.model_train.phantom import write_phantom_series
from ctdx.worker import claim as claims
from ctdx.worker import runtime
from ctdx.worker.celery_app import app, make_celery
from ctdx.worker.errors import TRANSIENT_ERRORS, WorkerNotReady
from ctdx.worker.tasks import process_study
from tests.worker.conftest import Checkpoints, StoredStudy, analysis_settings


@pytest.mark.parametrize("limit", [10, 60, 1800, 7200])
def test_redis_visibility_timeout_outlasts_the_hard_time_limit(limit: int) -> None:
    settings = load_settings(broker_url="redis://127.0.0.1:6379/0", task_time_limit=limit)
    _, options = broker_config(settings)
    assert options["visibility_timeout"] == visibility_timeout(settings)
    # Celery's Redis default (1 h) would hand a slow study to a second worker; ours must not
    assert options["visibility_timeout"] > limit + 300
    conf = make_celery(settings).conf
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit == limit
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.task_serializer == "json"
    assert conf.worker_proc_alive_timeout >= 60  # model loading in worker_process_init


def test_task_is_registered_with_narrow_retries() -> None:
    assert process_study.name == TASK_PROCESS_STUDY == "ctdx.process_study"
    assert app.tasks[TASK_PROCESS_STUDY] == process_study
    assert process_study.acks_late and process_study.reject_on_worker_lost
    assert process_study.max_retries is not None and process_study.max_retries > 0
    assert process_study.retry_jitter and process_study.retry_backoff
    assert Exception not in process_study.autoretry_for
    assert set(process_study.autoretry_for) == set(TRANSIENT_ERRORS)
    assert app.conf.task_routes[TASK_PROCESS_STUDY]["queue"] == QUEUE


@pytest.fixture
def sqlite_settings(tmp_path: Path, sqlite_url: str, checkpoints: Checkpoints,
                    small_rules: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    settings = analysis_settings(tmp_path / "data", sqlite_url, checkpoints, small_rules)
    monkeypatch.setitem(app.conf, "ctdx_settings", settings)
    yield settings


def test_task_runs_in_process_and_is_idempotent(
    tmp_path: Path, sqlite_settings: Settings, store: Callable[..., StoredStudy]
) -> None:
    study = write_phantom_series(tmp_path / "src", "normal", n_slices=6, size=64, seed=4)
    stored = store(sqlite_settings.resolved_database_url, list(study.paths))
    first = process_study.apply(args=[stored.study_version_id]).get()
    second = process_study.apply(args=[stored.study_version_id]).get()
    assert first["outcome"] == "analysed" and second["outcome"] == "already_done"
    assert first["analysis_id"] == second["analysis_id"]
    engine = make_engine(sqlite_settings.resolved_database_url)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Analysis)) == 1
    engine.dispose()


def test_task_leaves_a_study_held_by_a_live_worker_alone(
    tmp_path: Path, sqlite_settings: Settings, store: Callable[..., StoredStudy]
) -> None:
    study = write_phantom_series(tmp_path / "src", "normal", n_slices=6, size=64, seed=4)
    stored = store(sqlite_settings.resolved_database_url, list(study.paths))
    engine = make_engine(sqlite_settings.resolved_database_url)
    identity = runtime.get_models(sqlite_settings).identity
    held = claims.claim(engine, stored.study_version_id, identity, "elsewhere:7/x", 30)
    assert held.status is claims.ClaimStatus.CLAIMED
    result = process_study.apply(args=[stored.study_version_id]).get()
    assert result["outcome"] == "busy" and result["detail"] == "elsewhere:7/x"
    with session_scope(engine) as session:
        row = session.scalars(select(Analysis)).one()
        assert row.state == "running" and row.worker == "elsewhere:7/x"
    engine.dispose()


def test_worker_without_a_model_does_not_fail_the_study(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
    store: Callable[..., StoredStudy],
) -> None:
    settings = load_settings(data_dir=tmp_path / "data", database_url=sqlite_url, model=None)
    monkeypatch.setitem(app.conf, "ctdx_settings", settings)
    study = write_phantom_series(tmp_path / "src", "normal", n_slices=2, size=32, seed=0)
    stored = store(sqlite_url, list(study.paths))
    with pytest.raises(WorkerNotReady, match="CTDX_MODEL"):
        process_study.apply(args=[stored.study_version_id], throw=True)
    engine = make_engine(sqlite_url)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Analysis)) == 0
    engine.dispose()
