"""Reconciliation from the database (issue 14): what the broker lost is published again.

The first tests drive :mod:`ctdx.worker.reconcile` against real SQLite and PostgreSQL
databases (many reconcilers at once included). The slow ones are the faults as
they happen in a hospital, with real processes: a private Redis, ``ctdx scp``,
``ctdx worker`` (main and pool process killed together), dcmtk's storescp as the
PACS; each ends with every study analysed once and one SR at the PACS.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update

from ctdx.db import reconcile
from ctdx.db.models import (
    Analysis,
    AnalysisState,
    Export,
    OutboxEntry,
    ServiceHeartbeat,
    ServiceKind,
    Study,
    StudyVersion,
    VersionState,
    utcnow,
)
from ctdx.db.reconcile import PublishFailed, ServiceBeat
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings
from ctdx.model_train.phantom import write_phantom_series
from tests.conftest import free_port, require_tool, wait_for
from tests.report.conftest import StoreSCP
from tests.worker.conftest import Checkpoints, WorkerProcess, analysis_settings
from tests.worker.services import (
    CTDX,
    ListenerProcess,
    PrivateRedis,
    ctdx_status,
    problems_of,
)

CLAIM, QUEUED = 30.0, 60.0
#: CTDX_CLAIM_TIMEOUT of the fault tests (CTDX_QUEUED_TIMEOUT is twice it); small so they are
#: quick. CTDX_TEST_CLAIM_TIMEOUT=300 measures the defaults (README, reliability).
FAULT_CLAIM_TIMEOUT = float(os.environ.get("CTDX_TEST_CLAIM_TIMEOUT", "5"))


def _version(engine: Engine, state: VersionState, dispatched_ago: float | None,
             now: datetime) -> int:
    with session_scope(engine) as session:
        study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}")
        session.add(study)
        session.flush()
        version = StudyVersion(study_id=study.id, version=1, state=state.value,
                               completed_at=now - timedelta(seconds=900))
        session.add(version)
        session.flush()
        session.add(OutboxEntry(
            study_version_id=version.id, created_at=now - timedelta(seconds=900),
            dispatched_at=None if dispatched_ago is None
            else now - timedelta(seconds=dispatched_ago),
            attempts=1, next_attempt_at=now - timedelta(seconds=900),
        ))
        return version.id


def _claim(engine: Engine, version_id: int, heartbeat_ago: float, now: datetime,
           state: AnalysisState = AnalysisState.RUNNING) -> int:
    with session_scope(engine) as session:
        analysis = Analysis(
            study_version_id=version_id, state=state.value, model_name="m", model_version="1",
            model_uid=f"2.25.{uuid.uuid4().int}", worker="gone-host:1/x", attempts=1,
            claimed_at=now - timedelta(seconds=heartbeat_ago + 1),
            heartbeat_at=now - timedelta(seconds=heartbeat_ago),
            finished_at=now - timedelta(seconds=heartbeat_ago)
            if state != AnalysisState.RUNNING else None,
        )
        session.add(analysis)
        session.flush()
        return analysis.id


def test_stalled_versions_are_taken_once_and_only_when_overdue(engine: Engine) -> None:
    now = utcnow()
    lost = _version(engine, VersionState.QUEUED, QUEUED + 5, now)  # broker lost it
    waiting = _version(engine, VersionState.QUEUED, QUEUED - 5, now)  # still in the queue
    killed = _version(engine, VersionState.PROCESSING, 600, now)
    _claim(engine, killed, CLAIM + 5, now)  # its worker stopped beating
    alive = _version(engine, VersionState.PROCESSING, 600, now)
    _claim(engine, alive, 1, now)
    outbox_only = _version(engine, VersionState.COMPLETE, None, now)  # the dispatcher's job
    done = _version(engine, VersionState.ANALYSED, 900, now)

    taken = reconcile.take_stalled(engine, now, CLAIM, QUEUED)
    assert dict(taken) == {lost: reconcile.REASON_UNCLAIMED, killed: reconcile.REASON_STALE_CLAIM}
    assert reconcile.take_stalled(engine, now, CLAIM, QUEUED) == []  # stamped: not again now
    later = now + timedelta(seconds=QUEUED + 1)  # nobody claimed them meanwhile: again
    assert {v for v, _ in reconcile.take_stalled(engine, later, CLAIM, QUEUED)} >= {lost, killed}
    with session_scope(engine) as session:
        untouched = session.scalars(
            select(OutboxEntry.dispatched_at).where(
                OutboxEntry.study_version_id.in_([waiting, alive, outbox_only, done]))
        ).all()
    assert None in untouched and len(untouched) == 4


def test_many_reconcilers_at_once_publish_each_version_once(engine: Engine) -> None:
    """Eight processes' worth of reconcilers (threads with their own connections) race."""
    now = utcnow()
    stalled = {_version(engine, VersionState.QUEUED, QUEUED + 10, now) for _ in range(30)}
    sent: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def send(version_id: int) -> None:
        with lock:
            sent.append(version_id)

    def one() -> None:
        own = make_engine(str(engine.url.render_as_string(hide_password=False)))
        try:
            barrier.wait()
            reconcile.republish_stalled(own, send, CLAIM, QUEUED, now=now)
        finally:
            own.dispose()

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(sent) == sorted(stalled)  # every one, none twice


def test_broker_down_puts_stalled_versions_back_into_the_outbox(engine: Engine) -> None:
    now = utcnow()
    first = _version(engine, VersionState.QUEUED, QUEUED + 5, now)
    second = _version(engine, VersionState.QUEUED, QUEUED + 5, now)

    def refuse(version_id: int) -> None:
        raise PublishFailed("ConnectionRefusedError: broker down")

    result = reconcile.republish_stalled(engine, refuse, CLAIM, QUEUED, now=now)
    assert {(r.study_version_id, r.sent) for r in result} == {(first, False), (second, False)}
    with session_scope(engine) as session:
        rows = session.execute(
            select(OutboxEntry.dispatched_at, OutboxEntry.next_attempt_at, OutboxEntry.last_error)
        ).all()
    # undispatched and due: the listener's dispatcher sends them when the broker is back
    assert all(r.dispatched_at is None and r.next_attempt_at <= now for r in rows)
    assert all("broker down" in (r.last_error or "") for r in rows)


def test_analysed_study_without_reports_gets_them_published(engine: Engine,
                                                            tmp_path: Path) -> None:
    now = utcnow()
    settings = Settings(data_dir=tmp_path, pacs_host="127.0.0.1", pacs_port=free_port(),
                        claim_timeout=CLAIM)
    orphan_version = _version(engine, VersionState.ANALYSED, 900, now)
    orphan = _claim(engine, orphan_version, CLAIM + 5, now, AnalysisState.ANALYSED)
    fresh_version = _version(engine, VersionState.ANALYSED, 900, now)
    _claim(engine, fresh_version, 1, now, AnalysisState.ANALYSED)  # its worker publishes now
    refused_version = _version(engine, VersionState.ANALYSED, 900, now)
    refused = _claim(engine, refused_version, CLAIM + 5, now, AnalysisState.ANALYSED)
    with session_scope(engine) as session:  # every object failed the report checks
        session.execute(update(Analysis).where(Analysis.id == refused)
                        .values(report_problems="sr: invalid"))
    published: list[int] = []
    skip: set[int] = set()

    def publish(_engine: Engine, analysis_id: int, _settings: Settings) -> None:
        published.append(analysis_id)

    assert reconcile.publish_missing_reports(engine, settings, publish, skip, now) == [orphan]

    def unbuildable(_engine: Engine, analysis_id: int, _settings: Settings) -> None:
        raise ValueError("source images gone")

    assert reconcile.publish_missing_reports(engine, settings, unbuildable, skip, now) == []
    assert skip == {orphan}  # tried once, then left to an operator (no log flood)
    no_pacs = settings.model_copy(update={"pacs_host": None})
    assert reconcile.publish_missing_reports(engine, no_pacs, publish, set(), now) == []


def test_service_heartbeat_rows(engine: Engine) -> None:
    beat = ServiceBeat(engine, ServiceKind.WORKER, {"queues": ["ctdx"]})
    old = utcnow() - timedelta(days=2)
    with session_scope(engine) as session:
        session.add(ServiceHeartbeat(name="worker:old:1", kind="worker", host="old", pid=1,
                                     started_at=old, seen_at=old))
    beat.beat()
    beat.beat()
    with session_scope(engine) as session:
        rows = session.scalars(select(ServiceHeartbeat)).all()
        assert [(r.kind, r.pid, r.detail) for r in rows] == [("worker", os.getpid(),
                                                              {"queues": ["ctdx"]})]
    beat.leave()
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(ServiceHeartbeat)) == 0


def test_reconcile_interval_follows_the_timeouts() -> None:
    assert reconcile.reconcile_interval(Settings()) == 15.0  # defaults: 300 s / 600 s
    assert reconcile.reconcile_interval(Settings(claim_timeout=5, queued_timeout=10)) == 1.0
    assert reconcile.reconcile_interval(Settings(claim_timeout=60)) == 6.0


# --- faults with real processes ---------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path / "redis").start()
    yield redis
    redis.stop()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs", free_port())
    scp.start()
    yield scp
    scp.stop()


@pytest.fixture
def listener_process(tmp_path: Path) -> Iterator[Callable[[Settings], ListenerProcess]]:
    started: list[ListenerProcess] = []

    def _start(settings: Settings) -> ListenerProcess:
        process = ListenerProcess(settings, tmp_path / f"scp-{len(started)}.log")
        started.append(process)
        return process

    yield _start
    for process in started:
        process.stop()


def _fault_settings(tmp_path: Path, db_url: str, checkpoints: Checkpoints, rules: Path,
                    redis: PrivateRedis, pacs: StoreSCP, **kw: object) -> Settings:
    values: dict[str, object] = dict(
        broker_url=redis.url, host="127.0.0.1", port=free_port(), quiet_seconds=1.0,
        outbox_poll_seconds=0.2, min_free_bytes=0, batch_size=4,
        claim_timeout=FAULT_CLAIM_TIMEOUT, queued_timeout=2 * FAULT_CLAIM_TIMEOUT,
        task_time_limit=120, pacs_ae_title=pacs.ae_title,
        pacs_host="127.0.0.1", pacs_port=pacs.port,
    )
    values.update(kw)
    return analysis_settings(tmp_path / "data", db_url, checkpoints, rules, **values)


def _send_study(tmp_path: Path, port: int, name: str, n_slices: int, seed: int) -> None:
    study = write_phantom_series(tmp_path / name, "covid19", n_slices=n_slices, size=96,
                                 seed=seed)
    sent = subprocess.run(
        [require_tool("storescu"), "-aet", "SCANNER", "-aec", "CTDX", "+sd", "127.0.0.1",
         str(port), str(study.paths[0].parent)],
        capture_output=True, text=True, timeout=120,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _states(engine: Engine) -> list[str]:
    with session_scope(engine) as session:
        return list(session.scalars(select(StudyVersion.state).order_by(StudyVersion.id)))


def _queued(engine: Engine, n: int) -> bool:
    states = _states(engine)
    return len(states) == n and all(s == VersionState.QUEUED for s in states)


def _every_study_reported_once(engine: Engine, pacs: StoreSCP, n: int, attempts: int,
                               timeout: float, workers: list[WorkerProcess]) -> float:
    """Wait for n delivered SRs; check one analysis and one SR per study. Seconds waited."""
    started = time.monotonic()

    def delivered() -> bool:
        for w in workers:
            if w.proc.poll() is not None:
                raise AssertionError(f"worker exited:\n{w.output()}")
        with session_scope(engine) as session:
            rows = session.execute(select(Export.kind, Export.state)).all()
        return sum(r.kind == "sr" for r in rows) == n and all(
            r.state == "delivered" for r in rows)

    try:
        wait_for(delivered, timeout=timeout, interval=0.25, message=f"{n} SRs delivered")
    except AssertionError:
        for w in workers:
            print(w.output())
        raise
    waited = time.monotonic() - started
    with session_scope(engine) as session:
        analyses = session.scalars(select(Analysis).order_by(Analysis.id)).all()
        exports = session.scalars(select(Export)).all()
    assert _states(engine) == ["analysed"] * n
    assert len(analyses) == n and all(a.state == "analysed" for a in analyses)
    assert [a.attempts for a in analyses] == [attempts] * n  # a takeover at most once
    # one SR per study (and whatever else CTDX_REPORT_OUTPUTS asks for), each sent once
    assert sum(e.kind == "sr" for e in exports) == n and all(e.attempts == 1 for e in exports)
    assert len({(e.analysis_id, e.kind) for e in exports}) == len(exports)
    assert sorted(pacs.sop_instance_uids()) == sorted(e.sop_instance_uid for e in exports)
    return waited


@pytest.mark.slow
@pytest.mark.dcmtk
@pytest.mark.postgres
def test_whole_worker_killed_mid_analysis_then_a_new_worker_delivers_the_sr_once(
    tmp_path: Path, postgres_url: str, checkpoints: Checkpoints, small_rules: Path,
    private_redis: PrivateRedis, pacs: StoreSCP,
    listener_process: Callable[[Settings], ListenerProcess],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Power loss of a worker: kill -9 of its main and pool process together.

    The Celery message stays in Redis's unacked set for the visibility timeout (here 840 s);
    the SR must arrive within CTDX_CLAIM_TIMEOUT + 60 s of the kill anyway.
    """
    settings = _fault_settings(tmp_path, postgres_url, checkpoints, small_rules,
                               private_redis, pacs)
    engine = make_engine(postgres_url)
    try:
        listener = listener_process(settings)
        first = start_worker(settings, "ctdx", "first", pool="prefork", command=[CTDX, "worker"])
        wait_for(lambda: "ready." in first.output(), timeout=120, message="first worker ready")
        _send_study(tmp_path, settings.port, "study", n_slices=24, seed=11)

        def running() -> bool:
            with session_scope(engine) as session:
                return session.scalar(select(Analysis.state)) == "running"

        wait_for(running, timeout=90, interval=0.02, message="the first worker to claim")
        os.killpg(first.proc.pid, signal.SIGKILL)  # main + pool, as a power loss
        killed_at, killed_wall = time.monotonic(), utcnow()
        first.proc.wait(timeout=10)
        with session_scope(engine) as session:
            assert session.scalar(select(Analysis.state)) == "running"  # killed mid-analysis
        # its replacement starts at once (systemd's Restart=); it takes the study over only
        # once the claim is stale and the study published again
        second = start_worker(settings, "ctdx", "second", pool="prefork",
                              command=[CTDX, "worker"])

        def republished() -> bool:
            with session_scope(engine) as session:
                stamp = session.scalar(select(OutboxEntry.dispatched_at))
            return stamp is not None and stamp > killed_wall

        marks: dict[str, float] = {}

        def published_and_ready() -> bool:
            if "published" not in marks and republished():
                marks["published"] = time.monotonic() - killed_at
            if "ready" not in marks and "ready." in second.output():
                marks["ready"] = time.monotonic() - killed_at
            return len(marks) == 2

        wait_for(published_and_ready, timeout=settings.claim_timeout + 120, interval=0.1,
                 message="the study published again and the new worker ready")
        published, ready = marks["published"], marks["ready"]
        _every_study_reported_once(engine, pacs, 1, attempts=2, timeout=180, workers=[second])
        recovered = time.monotonic() - killed_at
        print(f"kill -9 of the whole worker (CTDX_CLAIM_TIMEOUT {settings.claim_timeout:.0f} s):"
              f" published again after {published:.1f} s, new worker ready after {ready:.1f} s,"
              f" SR at the PACS after {recovered:.1f} s")
        # the database notices within the timeout and a round (1 s here) plus scheduling slack;
        # the rest is the new worker's start-up and the analysis, slow on a loaded 2-core VM
        assert published < settings.claim_timeout + reconcile.reconcile_interval(settings) + 10
        assert recovered < max(ready, settings.claim_timeout) + 60
        assert "published to the broker again" in listener.text() + second.output()
        code, status = ctdx_status(settings)
        assert (code, status["status"], status["problems"]) == (0, "healthy", []), status
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.dcmtk
@pytest.mark.postgres
def test_redis_flushall_after_studies_were_queued(
    tmp_path: Path, postgres_url: str, checkpoints: Checkpoints, small_rules: Path,
    private_redis: PrivateRedis, pacs: StoreSCP,
    listener_process: Callable[[Settings], ListenerProcess],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Two studies queued while no worker runs; Redis loses every message (FLUSHALL)."""
    settings = _fault_settings(tmp_path, postgres_url, checkpoints, small_rules,
                               private_redis, pacs)
    engine = make_engine(postgres_url)
    try:
        listener_process(settings)
        _send_study(tmp_path, settings.port, "a", n_slices=8, seed=21)
        _send_study(tmp_path, settings.port, "b", n_slices=8, seed=22)
        wait_for(lambda: _queued(engine, 2), timeout=60, message="both studies queued")
        private_redis.flushall()
        flushed_at = time.monotonic()

        def overdue(status: dict[str, object]) -> bool:
            return problems_of(status).get("queue") == "degraded"  # type: ignore[arg-type]

        wait_for(lambda: overdue(ctdx_status(settings)[1]), timeout=settings.queued_timeout + 60,
                 interval=0.5,
                 message="ctdx status to see the unclaimed studies")
        code, status = ctdx_status(settings)
        assert code == 2 and problems_of(status)["worker"] == "down", status  # none ever ran
        worker = start_worker(settings, "ctdx", "after-flush", pool="prefork",
                              command=[CTDX, "worker"])
        _every_study_reported_once(engine, pacs, 2, attempts=1,
                                   timeout=180 + settings.queued_timeout, workers=[worker])
        print(f"FLUSHALL -> both SRs at the PACS: {time.monotonic() - flushed_at:.1f} s "
              f"(CTDX_QUEUED_TIMEOUT {settings.queued_timeout:.0f} s)")
        code, status = ctdx_status(settings)
        assert (code, status["status"]) == (0, "healthy"), status
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.dcmtk
def test_redis_restarted_without_persistence_while_a_worker_runs(
    tmp_path: Path, sqlite_url: str, checkpoints: Checkpoints, small_rules: Path,
    private_redis: PrivateRedis, pacs: StoreSCP,
    listener_process: Callable[[Settings], ListenerProcess],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """A worker busy with one study, a second waiting in Redis; Redis crashes and comes back
    empty. SQLite this time (the embedded installation's database, the same reconciliation)."""
    settings = _fault_settings(tmp_path, sqlite_url, checkpoints, small_rules,
                               private_redis, pacs)
    engine = make_engine(sqlite_url)
    try:
        listener = listener_process(settings)
        # Both studies are queued before the worker starts, a first: Redis hands them out in
        # order, so the worker is busy with the long one while the short one waits. (Sending to
        # a running worker left a window that a fast analysis of a could close before b came.)
        _send_study(tmp_path, settings.port, "a", n_slices=48, seed=31)
        wait_for(lambda: _queued(engine, 1), timeout=60, message="study a queued")
        _send_study(tmp_path, settings.port, "b", n_slices=8, seed=32)
        wait_for(lambda: _queued(engine, 2), timeout=60, message="both studies queued")
        worker = start_worker(settings, "ctdx", "busy", pool="prefork", command=[CTDX, "worker"])

        def one_busy_one_waiting() -> bool:  # prefetch 1: one waits in Redis, not the worker
            return _states(engine) == ["processing", "queued"]

        wait_for(one_busy_one_waiting, timeout=240, interval=0.05,
                 message="study a analysed while b waits in Redis")
        private_redis.restart()  # SIGKILL, then an empty Redis on the same port
        restarted_at = time.monotonic()
        _every_study_reported_once(engine, pacs, 2, attempts=1,
                                   timeout=180 + settings.queued_timeout, workers=[worker])
        print(f"Redis restarted empty -> both SRs at the PACS: "
              f"{time.monotonic() - restarted_at:.1f} s")
        assert re.search(r"study version \d+: queued without a worker claiming it .* published",
                         listener.text() + worker.output())
    finally:
        engine.dispose()
