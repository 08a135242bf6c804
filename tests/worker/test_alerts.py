"""Alerts (db/alerts.py): webhooks to a real local HTTP receiver, from a real worker process.

The receiver is ``http.server`` on a free port (tests/worker/alert_receiver.py).
What a receiver must be able to rely on is checked from docs/alerts.md: the
signature recomputed from the raw body with the documented recipe, the schema
fields, no PHI unless ``CTDX_ALERT_INCLUDE_PHI``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from ctdx.db import alerts
from ctdx.db.models import Alert, Analysis, Export, Study, StudyVersion, utcnow
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings, load_settings
from ctdx.model_train.phantom import write_phantom_series
from ctdx.worker.report import delivery, outbox
from tests.conftest import REPO_ROOT, free_port, wait_for
from tests.worker.alert_receiver import Receiver
from tests.worker.conftest import Checkpoints, StoredStudy, analysis_settings

SECRET = "correct horse battery staple"
PHI = ("PHANTOM^SYNTHETIC", "PHANTOM-0001", "Doe^Jane", "PID-4711")


def documented_signature(secret: str, body: bytes) -> str:
    """The receiver's check, written from docs/alerts.md (not from db/alerts.py)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port()).start()
    yield r
    r.stop()


def make_settings(tmp_path: Path, url: str, hooks: list[str], **kw: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=tmp_path / "data", database_url=url, alert_webhook_urls=",".join(hooks),
        alert_secret=SECRET, alert_backoff_seconds=0.2, alert_timeout_seconds=2,
        alert_max_attempts=4)
    values.update(kw)
    return load_settings(**values)


def add_analysis(engine: Engine, *, decision: str | None = "covid19", state: str = "analysed",
                 patient_id: str = "PID-4711", accession: str = "ACC-1") -> int:
    with session_scope(engine) as s:
        study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", patient_id=patient_id,
                      patient_name="Doe^Jane", accession_number=accession)
        s.add(study)
        s.flush()
        version = StudyVersion(study_id=study.id, version=1, state=state)
        s.add(version)
        s.flush()
        analysis = Analysis(study_version_id=version.id, state=state, model_name="m",
                            model_version="1", model_uid=f"2.25.{uuid.uuid4().int}",
                            decision=decision, fraction_covid19=0.4 if decision else None,
                            threshold=0.05, finished_at=utcnow(),
                            failure_reason="no usable series" if state == "failed" else None)
        s.add(analysis)
        s.flush()
        return analysis.id


def rows(engine: Engine) -> list[Alert]:
    with session_scope(engine) as s:
        return list(s.scalars(select(Alert).order_by(Alert.id)))


def deliver_until(engine: Engine, settings: Settings, done: Callable[[], bool],
                  timeout: float = 30) -> None:
    def step() -> bool:
        alerts.deliver_due(engine, settings)
        return done()

    wait_for(step, timeout=timeout, interval=0.1, message="alert delivery")


def test_covid_alert_is_signed_schema_conform_and_without_phi(
    tmp_path: Path, db_url: str, receiver: Receiver
) -> None:
    settings = make_settings(tmp_path, db_url, [receiver.url])
    engine = make_engine(db_url)
    analysis_id = add_analysis(engine)
    assert alerts.emit(engine, settings, "analysis", analysis_id)
    assert alerts.emit(engine, settings, "analysis", analysis_id) == []  # the same event: once
    deliver_until(engine, settings, lambda: len(receiver.received) == 1)

    got = receiver.received[0]
    assert got.headers["X-Ctdx-Signature"] == documented_signature(SECRET, got.body)
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Ctdx-Event"] == "study.covid19"
    body = got.json()
    assert body["schema"] == "ctdx.alert/1" and body["event"] == "study.covid19"
    assert body["id"] == f"study.covid19:analysis:{analysis_id}"
    assert body["study"]["accession_number"] == "ACC-1"
    assert body["analysis"]["decision"] == "covid19" and body["analysis"]["id"] == analysis_id
    assert not any(p.encode() in got.body for p in PHI), "PHI in an alert by default"
    assert "patient_id" not in body["study"]
    assert [r.state for r in rows(engine)] == ["delivered"]
    engine.dispose()


def test_phi_only_when_the_setting_allows_it(
    tmp_path: Path, sqlite_url: str, receiver: Receiver
) -> None:
    settings = make_settings(tmp_path, sqlite_url, [receiver.url], alert_include_phi=True)
    engine = make_engine(sqlite_url)
    alerts.emit(engine, settings, "analysis", add_analysis(engine))
    deliver_until(engine, settings, lambda: len(receiver.received) == 1)
    study = receiver.received[0].json()["study"]
    assert study["patient_id"] == "PID-4711" and study["patient_name"] == "Doe^Jane"
    engine.dispose()


def test_an_alert_is_retried_while_the_receiver_is_down_then_delivered(
    tmp_path: Path, db_url: str
) -> None:
    port = free_port()  # nothing listens there yet
    settings = make_settings(tmp_path, db_url, [f"http://127.0.0.1:{port}/hook"])
    engine = make_engine(db_url)
    failed = add_analysis(engine, decision=None, state="failed")
    alerts.emit(engine, settings, "analysis", failed)
    assert alerts.deliver_due(engine, settings) == 1
    (row,) = rows(engine)
    assert row.state == "pending" and row.attempts == 1 and "cannot POST" in (row.last_error or "")
    assert row.next_attempt_at > utcnow()  # backoff: not due at once

    receiver = Receiver(port).start()
    try:
        deliver_until(engine, settings, lambda: len(receiver.received) == 1)
    finally:
        receiver.stop()
    (row,) = rows(engine)
    assert row.state == "delivered" and row.attempts >= 2
    got = receiver.received[0]
    assert got.json()["event"] == "study.failed"
    assert got.json()["analysis"]["failure_reason"] == "no usable series"
    assert got.headers["X-Ctdx-Delivery"] == str(row.id)
    assert got.headers["X-Ctdx-Signature"] == documented_signature(SECRET, got.body)
    engine.dispose()


def test_errors_redirects_and_slow_receivers_end_dead_after_the_attempts(
    tmp_path: Path, sqlite_url: str, receiver: Receiver
) -> None:
    engine = make_engine(sqlite_url)
    for status in (500, 302):
        receiver.status = status
        receiver.received.clear()
        settings = make_settings(tmp_path, sqlite_url, [receiver.url])
        ids = alerts.emit(engine, settings, "analysis", add_analysis(engine))

        def dead(ids: list[int] = ids) -> bool:
            return {r.state for r in rows(engine) if r.id in ids} == {"dead"}

        deliver_until(engine, settings, dead)
        (row,) = [r for r in rows(engine) if r.id in ids]
        assert row.attempts == settings.alert_max_attempts and row.last_status == status
        assert all(r.path == "/hook" for r in receiver.received)  # a redirect is not followed

    receiver.status = 200
    receiver.hold.clear()  # the receiver takes the request and does not answer
    settings = make_settings(tmp_path, sqlite_url, [receiver.url], alert_timeout_seconds=1,
                             alert_max_attempts=1)
    ids = alerts.emit(engine, settings, "analysis", add_analysis(engine))
    started = time.monotonic()
    alerts.deliver_due(engine, settings)
    assert time.monotonic() - started < 10  # bounded by the time-out, not by the receiver
    assert [r.state for r in rows(engine) if r.id in ids] == ["dead"]
    receiver.hold.set()
    engine.dispose()


def test_a_dead_export_alerts_and_test_studies_never_do(
    tmp_path: Path, sqlite_url: str, receiver: Receiver
) -> None:
    settings = make_settings(tmp_path, sqlite_url, [receiver.url], export_max_attempts=1,
                             network_timeout=2)
    engine = make_engine(sqlite_url)
    analysis_id = add_analysis(engine, decision="normal")  # a normal call: no alert
    assert alerts.emit(engine, settings, "analysis", analysis_id) == []
    report = settings.data_dir / "sr" / "x.dcm"
    report.parent.mkdir(parents=True)
    report.write_bytes(b"not dicom")
    closed = outbox.Destination("PACS", "127.0.0.1", free_port())
    (export_id,) = outbox.record_exports(
        engine, analysis_id, [outbox.StoredObject("sr", "2.25.1", "sr/x.dcm")], closed, utcnow())
    assert delivery.deliver_due(engine, settings) == 1  # fails, and with 1 attempt it is dead
    with session_scope(engine) as s:
        assert s.get_one(Export, export_id).state == "dead"
    deliver_until(engine, settings, lambda: len(receiver.received) == 1)
    body = receiver.received[0].json()
    assert body["event"] == "export.dead" and body["export"]["id"] == export_id

    test_study = add_analysis(engine, patient_id="CTDX-SELFTEST")
    failed_test = add_analysis(engine, state="failed", decision=None, patient_id="CTDX-SELFTEST")
    assert alerts.emit(engine, settings, "analysis", test_study) == []
    assert alerts.emit(engine, settings, "analysis", failed_test) == []

    only_dead = make_settings(tmp_path, sqlite_url, [receiver.url], alert_events="export.dead")
    assert alerts.emit(engine, only_dead, "analysis", add_analysis(engine)) == []
    engine.dispose()


def test_status_changed_is_ready_for_ctdx_status(
    tmp_path: Path, sqlite_url: str, receiver: Receiver
) -> None:
    settings = make_settings(tmp_path, sqlite_url, [receiver.url])
    engine = make_engine(sqlite_url)
    assert alerts.status_changed(engine, settings, "ok", "degraded", ["broker unreachable"])
    deliver_until(engine, settings, lambda: len(receiver.received) == 1)
    assert receiver.received[0].json()["status"] == {
        "previous": "ok", "current": "degraded", "problems": ["broker unreachable"]}
    engine.dispose()


# --- a real worker: an analysed study's alert, while the analysis is not held up ---------


def worker_env(settings: Settings) -> dict[str, str]:
    from ctdx.worker.demo import settings_environment

    env = {k: v for k, v in os.environ.items() if not k.startswith("CTDX_")}
    env.update(settings_environment(settings))
    return env


@pytest.mark.slow
def test_a_worker_process_alerts_a_covid_study_and_an_unreachable_receiver_holds_nothing_up(
    tmp_path: Path, sqlite_url: str, checkpoints: Checkpoints, small_rules: Path,
    store: Callable[..., StoredStudy], receiver: Receiver,
) -> None:
    down = f"http://127.0.0.1:{free_port()}/hook"  # a second receiver that never answers
    settings = analysis_settings(
        tmp_path / "data", sqlite_url, checkpoints, small_rules, broker_url="embedded",
        alert_webhook_urls=f"{receiver.url},{down}", alert_secret=SECRET,
        alert_backoff_seconds=60, prune_interval_seconds=0)
    study = write_phantom_series(tmp_path / "in", "covid19", n_slices=8, size=128, seed=5)
    stored = store(sqlite_url, list(study.paths))
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from ctdx.cli import main; main()", "worker", "--pool", "solo",
             "--loglevel", "INFO", "--hostname", f"alerts-{uuid.uuid4().hex[:6]}@%h"],
            cwd=REPO_ROOT, env=worker_env(settings), stdout=fh, stderr=subprocess.STDOUT)
    try:
        from ctdx.scp.outbox import CelerySender

        CelerySender(settings).send(stored.study_version_id)
        engine = make_engine(sqlite_url)

        def alerted() -> bool:
            if proc.poll() is not None:
                raise AssertionError(log.read_text(errors="replace")[-4000:])
            return len(receiver.received) == 1

        wait_for(alerted, timeout=300, interval=0.5, message="the COVID-19 alert")
        got = receiver.received[0]
        assert got.headers["X-Ctdx-Signature"] == documented_signature(SECRET, got.body)
        body = got.json()
        assert body["event"] == "study.covid19"
        assert body["study"]["study_instance_uid"] == stored.study_instance_uid
        assert not any(p.encode() in got.body for p in PHI)
        def states() -> dict[str, str]:
            with session_scope(engine) as s:
                return {r.url: r.state for r in s.scalars(select(Alert))}

        # the row is marked after the receiver answered
        wait_for(lambda: states().get(receiver.url) == "delivered", timeout=30,
                 message="the delivered alert recorded")
        assert states()[down] == "pending"
        with session_scope(engine) as s:
            assert s.scalar(select(StudyVersion.state)) == "analysed"
        engine.dispose()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
