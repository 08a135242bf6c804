"""Real Celery workers in subprocesses: Redis, the embedded broker, a worker killed mid-study.

Each Redis test consumes its own queue (``-Q``) and deletes its keys afterwards;
nothing else on the shared Redis is touched.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from ctdx.db.broker import TASK_PROCESS_STUDY, task_id_for
from ctdx.db.models import Analysis, SliceResult, StudyVersion
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings
from ctdx.model_train.method.checkpoint import read_checkpoint_meta
from ctdx.model_train.phantom import write_phantom_series
from ctdx.worker import claim as claims
from ctdx.worker.celery_app import make_celery
from ctdx.worker.claim import ModelIdentity
from tests.conftest import wait_for
from tests.worker.conftest import Checkpoints, StoredStudy, WorkerProcess, analysis_settings


def _send(settings: Settings, queue: str, version_id: int) -> None:
    sender = make_celery(settings)
    sender.send_task(TASK_PROCESS_STUDY, args=[version_id], queue=queue,
                     task_id=task_id_for(version_id))
    sender.close()


def _one_analysis(engine: Engine, version_id: int) -> tuple[Analysis, int]:
    with session_scope(engine) as session:
        [analysis] = session.scalars(
            select(Analysis).where(Analysis.study_version_id == version_id)
        ).all()
        slices = session.scalar(select(func.count()).select_from(SliceResult).where(
            SliceResult.analysis_id == analysis.id))
        return analysis, int(slices or 0)


def _wait_analysed(engine: Engine, version_id: int, worker: WorkerProcess,
                   timeout: float = 120) -> None:
    def check() -> bool:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{worker.output()}")
        with session_scope(engine) as session:
            state = session.scalar(select(StudyVersion.state).where(StudyVersion.id == version_id))
        return state in ("analysed", "failed")

    try:
        wait_for(check, timeout=timeout, interval=0.2, message=f"study version {version_id}")
    except AssertionError:
        print(worker.output())
        raise


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_celery_worker_on_redis_analyses_a_study_once(
    tmp_path: Path, redis_url: str, redis_queue: str, postgres_url: str, checkpoints: Checkpoints,
    small_rules: Path, store: Callable[..., StoredStudy],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """The production combination: Redis broker, PostgreSQL database.

    Also a study whose claim is held by a worker on another host that died: the
    task finds it busy, re-checks after ``claim_timeout`` and takes it over once.
    """
    db_url = postgres_url
    settings = analysis_settings(tmp_path / "data", db_url, checkpoints, small_rules,
                                 broker_url=f"{redis_url}/0", claim_timeout=5)
    study = write_phantom_series(tmp_path / "src", "covid19", n_slices=8, size=96, seed=5)
    stored = store(db_url, list(study.paths))
    orphan = store(db_url, list(write_phantom_series(
        tmp_path / "orphan", "normal", n_slices=6, size=64, seed=8).paths))
    meta = read_checkpoint_meta(checkpoints.recognition)
    identity = ModelIdentity(meta.model_name, meta.model_version, meta.model_uid)
    engine = make_engine(db_url)
    worker = start_worker(settings, redis_queue, "redis")
    _send(settings, redis_queue, stored.study_version_id)
    _send(settings, redis_queue, stored.study_version_id)  # the outbox re-sent it
    try:
        _wait_analysed(engine, stored.study_version_id, worker)
        analysis, slices = _one_analysis(engine, stored.study_version_id)
        assert analysis.state == "analysed" and analysis.slices_total == 8 and slices == 8
        # the duplicate is consumed and does nothing
        wait_for(lambda: "already analysed" in worker.output(), timeout=60,
                 message="the duplicate task to be seen")
        again, slices_again = _one_analysis(engine, stored.study_version_id)
        assert again.id == analysis.id and again.attempts == 1 and slices_again == 8

        held = claims.claim(engine, orphan.study_version_id, identity, "other-host:4242/dead", 5)
        assert held.status is claims.ClaimStatus.CLAIMED  # its heartbeat stops now
        _send(settings, redis_queue, orphan.study_version_id)
        _wait_analysed(engine, orphan.study_version_id, worker, timeout=90)
        taken, taken_slices = _one_analysis(engine, orphan.study_version_id)
        assert taken.state == "analysed" and taken.attempts == 2 and taken_slices == 6
        log = worker.output()
        assert "held by live worker other-host:4242/dead" in log
        assert "from other-host:4242/dead (stale heartbeat)" in log
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.redis
def test_worker_killed_mid_study_is_taken_over_once(
    tmp_path: Path, redis_url: str, redis_queue: str, sqlite_url: str, checkpoints: Checkpoints,
    small_rules: Path, store: Callable[..., StoredStudy],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    settings = analysis_settings(tmp_path / "data", sqlite_url, checkpoints, small_rules,
                                 broker_url=f"{redis_url}/0", task_time_limit=120,
                                 batch_size=4)
    study = write_phantom_series(tmp_path / "src", "covid19", n_slices=16, size=96, seed=6)
    stored = store(sqlite_url, list(study.paths))
    first = start_worker(settings, redis_queue, "first", pool="prefork")
    second = start_worker(settings, redis_queue, "second", pool="prefork")
    for w in (first, second):
        wait_for(lambda w=w: "ready." in w.output(), timeout=60, message="worker ready")
    engine = make_engine(sqlite_url)
    try:
        _send(settings, redis_queue, stored.study_version_id)

        def holder() -> str | None:
            with session_scope(engine) as session:
                row = session.execute(select(Analysis.worker, Analysis.state)).one_or_none()
            return row.worker if row is not None and row.state == "running" else None

        victim = wait_for(holder, timeout=60, interval=0.02, message="a worker to claim")
        assert isinstance(victim, str)
        pid = int(victim.rsplit(":", 1)[1].split("/", 1)[0])
        os.kill(pid, signal.SIGKILL)  # mid-study: the claim is running, no results yet

        _wait_analysed(engine, stored.study_version_id, first, timeout=180)
        analysis, slices = _one_analysis(engine, stored.study_version_id)
        assert analysis.state == "analysed" and slices == 16
        assert analysis.attempts == 2  # taken over exactly once
        assert analysis.worker and f":{pid}/" not in analysis.worker
        # the pool replaced the killed process (models load within worker_proc_alive_timeout)
        logs = first.output() + second.output()
        assert "exited with 'signal 9" in logs and "Timed out waiting for UP" not in logs
    finally:
        engine.dispose()


@pytest.mark.slow
def test_ctdx_worker_on_the_embedded_broker(
    tmp_path: Path, sqlite_url: str, checkpoints: Checkpoints, small_rules: Path,
    store: Callable[..., StoredStudy], start_worker: Callable[..., WorkerProcess],
) -> None:
    """No Redis: kombu's filesystem transport under the data dir, started with `ctdx worker`."""
    settings = analysis_settings(tmp_path / "data", sqlite_url, checkpoints, small_rules,
                                 broker_url="embedded")
    study = write_phantom_series(tmp_path / "src", "normal", n_slices=6, size=64, seed=7)
    stored = store(sqlite_url, list(study.paths))
    ctdx = str(Path(sys.executable).with_name("ctdx"))
    worker = start_worker(settings, "ctdx", "embedded", pool="prefork", command=[ctdx, "worker"])
    _send(settings, "ctdx", stored.study_version_id)
    engine = make_engine(sqlite_url)
    try:
        _wait_analysed(engine, stored.study_version_id, worker)
        analysis, slices = _one_analysis(engine, stored.study_version_id)
        assert analysis.state == "analysed" and slices == 6
        assert (tmp_path / "data" / "queue" / "messages").is_dir()
        assert "export delivery loop started" in worker.output()
    finally:
        engine.dispose()
