"""`ctdx studies requeue` and `ctdx exports retry`: state changes, refusals, audit rows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from ctdx.db.models import (
    Analysis,
    AuditEntry,
    Export,
    OutboxEntry,
    SliceResult,
    Study,
    StudyVersion,
    utcnow,
)
from ctdx.db.operations import default_actor
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import load_settings
from tests.cli.conftest import Filled, ctdx, flat


@pytest.fixture
def engine_of(scenario_db: Filled) -> Iterator[Engine]:
    engine = make_engine(scenario_db.url)
    yield engine
    engine.dispose()


def _audit(engine: Engine) -> list[AuditEntry]:
    with session_scope(engine) as s:
        return list(s.scalars(select(AuditEntry).order_by(AuditEntry.id)))


def _newest_version(engine: Engine, study_uid: str) -> tuple[StudyVersion, OutboxEntry | None]:
    with session_scope(engine) as s:
        version = s.scalars(
            select(StudyVersion).join(Study).where(Study.study_instance_uid == study_uid)
            .order_by(StudyVersion.version.desc()).limit(1)
        ).one()
        outbox = s.scalars(
            select(OutboxEntry).where(OutboxEntry.study_version_id == version.id)
        ).one_or_none()
        return version, outbox


def test_requeue_failed_study_reopens_outbox_and_is_audited(
    scenario_db: Filled, engine_of: Engine
) -> None:
    uid = scenario_db.scenario.uids["failed"]
    before = utcnow()
    result = ctdx("studies", "requeue", uid, "--database-url", scenario_db.url)
    assert result.exit_code == 0, result.output
    assert f"requeued study {uid} version 1 (was failed)" in flat(result.stdout)

    version, outbox = _newest_version(engine_of, uid)
    assert version.state == "complete"
    assert outbox is not None and outbox.dispatched_at is None and outbox.attempts == 0
    assert before - timedelta(seconds=1) <= outbox.next_attempt_at <= utcnow()
    with session_scope(engine_of) as s:  # the failed analysis goes, so a worker tries again
        assert s.scalar(
            select(func.count(Analysis.id)).where(Analysis.study_version_id == version.id)
        ) == 0

    (entry,) = _audit(engine_of)
    assert entry.action == "studies.requeue" and entry.target == uid
    assert entry.actor == default_actor() and "@" in entry.actor
    assert before - timedelta(seconds=1) <= entry.at <= utcnow()
    detail = json.loads(entry.detail or "{}")
    assert detail["previous_state"] == "failed" and detail["forced"] is False
    assert detail["analyses"][0]["removed"] is True
    assert detail["analyses"][0]["failure_reason"].startswith("no usable CT series")

    shown = ctdx("results", "show", uid, "--database-url", scenario_db.url)
    assert "studies.requeue (was failed)" in flat(shown.stdout)
    assert default_actor() in shown.stdout


def test_requeue_analysed_study_keeps_its_results(scenario_db: Filled, engine_of: Engine) -> None:
    result = ctdx("studies", "requeue", "ACC-COVID", "--database-url", scenario_db.url)
    assert result.exit_code == 0, result.output
    version, outbox = _newest_version(engine_of, scenario_db.scenario.uids["covid"])
    assert version.state == "complete" and outbox is not None and outbox.dispatched_at is None
    with session_scope(engine_of) as s:
        analysis = s.scalars(select(Analysis).where(Analysis.study_version_id == version.id)).one()
        assert analysis.state == "analysed"
        assert s.scalar(
            select(func.count(SliceResult.id)).where(SliceResult.analysis_id == analysis.id)
        ) == 12
    assert [e.action for e in _audit(engine_of)] == ["studies.requeue"]


@pytest.mark.parametrize(
    ("name", "state", "message"),
    [
        ("receiving", None, "is still arriving"),
        ("requeued", None, "is already queued and not finished"),
        ("covid", "processing", "is being analysed"),
        ("covid", "complete", "is waiting in the outbox to be queued"),
    ],
)
def test_requeue_refused_while_arriving_or_in_flight(
    scenario_db: Filled, engine_of: Engine, name: str, state: str | None, message: str
) -> None:
    uid = scenario_db.scenario.uids[name]
    if state is not None:
        with session_scope(engine_of) as s:
            version = s.scalars(
                select(StudyVersion).join(Study).where(Study.study_instance_uid == uid)
            ).one()
            version.state = state
    state_before = _newest_version(engine_of, uid)[0].state
    result = ctdx("studies", "requeue", uid, "--database-url", scenario_db.url)
    assert result.exit_code == 5
    assert message in flat(result.stderr)
    assert _newest_version(engine_of, uid)[0].state == state_before
    assert _audit(engine_of) == []


def test_requeue_force_for_a_lost_task(scenario_db: Filled, engine_of: Engine) -> None:
    uid = scenario_db.scenario.uids["requeued"]
    result = ctdx("studies", "requeue", "ACC-V2", "--force", "--database-url", scenario_db.url)
    assert result.exit_code == 0, result.output
    version, outbox = _newest_version(engine_of, uid)
    assert version.version == 2 and version.state == "complete"
    assert outbox is not None and outbox.dispatched_at is None
    (entry,) = _audit(engine_of)
    assert json.loads(entry.detail or "{}")["forced"] is True


def test_requeue_unknown_and_ambiguous(scenario_db: Filled, engine_of: Engine) -> None:
    unknown = ctdx("studies", "requeue", "1.2.3", "--database-url", scenario_db.url)
    assert unknown.exit_code == 4 and "no study" in flat(unknown.stderr)
    with session_scope(engine_of) as s:  # a second study with the same accession number
        s.add(Study(study_instance_uid="1.2.3.4.5.6", accession_number="ACC-COVID",
                    created_at=utcnow()))
    ambiguous = ctdx("studies", "requeue", "ACC-COVID", "--database-url", scenario_db.url)
    assert ambiguous.exit_code == 2
    assert "belongs to 2 studies" in flat(ambiguous.stderr)
    assert _audit(engine_of) == []


def test_retry_dead_export_by_id(scenario_db: Filled, engine_of: Engine) -> None:
    export_id = scenario_db.scenario.exports["dead"]
    before = utcnow()
    result = ctdx("exports", "retry", str(export_id), "--database-url", scenario_db.url)
    assert result.exit_code == 0, result.output
    assert f"export {export_id} to PACS@127.0.0.1:11112 is pending again" in flat(result.stdout)
    assert "was dead after 8 attempts" in flat(result.stdout)
    with session_scope(engine_of) as s:
        export = s.get(Export, export_id)
        assert export is not None
        assert export.state == "pending" and export.attempts == 0
        assert before - timedelta(seconds=1) <= export.next_attempt_at <= utcnow()
    (entry,) = _audit(engine_of)
    assert entry.action == "exports.retry" and entry.target == str(export_id)
    assert entry.actor == default_actor()
    detail = json.loads(entry.detail or "{}")
    assert detail["previous_state"] == "dead" and detail["attempts"] == 8
    assert detail["last_error"].startswith("association rejected")
    assert detail["study_instance_uid"] == scenario_db.scenario.uids["dead"]


def test_retry_all_dead_then_nothing_left(scenario_db: Filled, engine_of: Engine) -> None:
    first = ctdx("exports", "retry", "--dead", "--database-url", scenario_db.url)
    assert first.exit_code == 0, first.output
    assert "pending again" in first.stdout
    dead = ctdx("exports", "list", "--state", "dead", "-f", "json",
                "--database-url", scenario_db.url)
    assert json.loads(dead.stdout) == []
    again = ctdx("exports", "retry", "--dead", "--database-url", scenario_db.url)
    assert again.exit_code == 0 and "nothing to retry" in again.stdout
    assert [e.target for e in _audit(engine_of)] == [str(scenario_db.scenario.exports["dead"])]


def test_retry_refusals(scenario_db: Filled, engine_of: Engine) -> None:
    sc = scenario_db.scenario
    delivered = ctdx("exports", "retry", str(sc.exports["covid"]), "--database-url",
                     scenario_db.url)
    assert delivered.exit_code == 5 and "already delivered" in flat(delivered.stderr)
    with session_scope(engine_of) as s:  # a sender holds a live claim on the pending one
        export = s.get(Export, sc.exports["pending"])
        assert export is not None
        export.claimed_by = "sender:1/abc"
        export.next_attempt_at = utcnow() + timedelta(minutes=5)
    claimed = ctdx("exports", "retry", str(sc.exports["pending"]), "--database-url",
                   scenario_db.url)
    assert claimed.exit_code == 5 and "being sent right now" in flat(claimed.stderr)
    unknown = ctdx("exports", "retry", "999999", "--database-url", scenario_db.url)
    assert unknown.exit_code == 4 and "no export with id 999999" in flat(unknown.stderr)
    for args in ([], [str(sc.exports["dead"]), "--dead"]):
        usage = ctdx("exports", "retry", *args, "--database-url", scenario_db.url)
        assert usage.exit_code == 2 and "give an export ID or --dead" in flat(usage.stderr)
    assert _audit(engine_of) == []


class RecordingSender:
    """The broker side of the listener's outbox dispatcher, recording what it is handed."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, study_version_id: int) -> None:
        self.sent.append(study_version_id)


def test_requeued_study_is_handed_to_the_queue_by_the_listeners_dispatcher(
    scenario_db: Filled, engine_of: Engine
) -> None:
    from ctdx.scp.outbox import OutboxDispatcher

    uid = scenario_db.scenario.uids["failed"]
    sender = RecordingSender()
    dispatcher = OutboxDispatcher(engine_of, sender, retry_seconds=1.0)
    assert dispatcher.dispatch_due() == 0  # everything was dispatched before
    assert ctdx("studies", "requeue", uid, "--database-url", scenario_db.url).exit_code == 0
    assert dispatcher.dispatch_due() == 1
    version, outbox = _newest_version(engine_of, uid)
    assert sender.sent == [version.id]
    assert version.state == "queued" and outbox is not None and outbox.dispatched_at is not None


def test_retried_export_is_claimed_by_the_report_sender(
    scenario_db: Filled, engine_of: Engine, tmp_path: Path
) -> None:
    from ctdx.worker.report.outbox import claim_due

    export_id = scenario_db.scenario.exports["dead"]
    settings = load_settings(data_dir=tmp_path)
    ids = [export_id]
    assert claim_due(engine_of, settings, utcnow(), ids=ids) == []  # dead: never claimed
    retried = ctdx("exports", "retry", str(export_id), "--database-url", scenario_db.url)
    assert retried.exit_code == 0
    (claimed,) = claim_due(engine_of, settings, utcnow(), ids=ids)
    assert claimed.id == export_id and claimed.attempts == 1  # a fresh schedule
    # now claimed: a second retry would race the sender, and is refused
    again = ctdx("exports", "retry", str(export_id), "--database-url", scenario_db.url)
    assert again.exit_code == 5 and "being sent right now" in flat(again.stderr)
