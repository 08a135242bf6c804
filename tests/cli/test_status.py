"""`ctdx status`: exit 0 healthy, 1 degraded, 2 down; one line per problem with what to do.

Each state is made real: a broker port nobody listens on, a database file that is
absent or behind, heartbeat rows that aged, a backlog, a stale claim, dead and
overdue exports, a disk guard larger than the disk. The running-services states
(a killed worker's stale claim, healthy after recovery) are checked with real
processes in tests/worker/test_reconcile.py.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine

from ctdx.db import migrate
from ctdx.db.models import (
    Analysis,
    Export,
    OutboxEntry,
    ServiceKind,
    Study,
    StudyVersion,
    utcnow,
)
from ctdx.db.reconcile import ServiceBeat
from ctdx.db.session import make_engine, session_scope
from tests.cli.conftest import ctdx, flat
from tests.conftest import free_port


@pytest.fixture
def engine_at(db_url: str) -> Any:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def _env(db_url: str, tmp_path: Path, broker: str, **extra: str) -> dict[str, str]:
    return {"CTDX_DATABASE_URL": db_url, "CTDX_DATA_DIR": str(tmp_path / "data"),
            "CTDX_BROKER_URL": broker, "CTDX_MIN_FREE_BYTES": "0", **extra}


def _status(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    result = ctdx("status", "-f", "json", env=env)
    return result.exit_code, json.loads(result.stdout)


def _checks(status: dict[str, Any]) -> dict[str, str]:
    return {p["check"]: p["severity"] for p in status["problems"]}


def _alive(engine: Engine) -> None:
    ServiceBeat(engine, ServiceKind.LISTENER).beat()
    ServiceBeat(engine, ServiceKind.WORKER).beat()


def _version(engine: Engine, state: str, now: datetime) -> int:
    with session_scope(engine) as session:
        study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}")
        session.add(study)
        session.flush()
        version = StudyVersion(study_id=study.id, version=1, state=state, completed_at=now)
        session.add(version)
        session.flush()
        return version.id


def test_healthy_with_live_services_and_a_reachable_broker(
    db_url: str, engine_at: Engine, tmp_path: Path, redis_url: str
) -> None:
    _alive(engine_at)
    env = _env(db_url, tmp_path, f"{redis_url}/0")  # only connects; nothing is written
    code, status = _status(env)
    assert (code, status["status"], status["problems"]) == (0, "healthy", [])
    numbers = status["numbers"]
    assert numbers["outbox_waiting"] == 0 and numbers["last_seen_seconds"]["worker"] < 60
    table = ctdx("status", env=env)
    assert table.exit_code == 0 and table.stdout.startswith("ctdx healthy")


def test_broker_unreachable_and_no_services_is_down(
    db_url: str, tmp_path: Path
) -> None:
    env = _env(db_url, tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    code, status = _status(env)
    assert code == 2 and status["status"] == "down"
    assert _checks(status) == {"broker": "down", "listener": "down", "worker": "down"}
    table = ctdx("status", env=env)
    assert table.exit_code == 2
    lines = table.stdout.splitlines()
    broker = next(line for line in lines if "broker:" in line)
    assert broker.startswith("DOWN") and "Do: start Redis or fix CTDX_BROKER_URL" in broker
    assert any("no worker (ctdx worker) seen ever" in line for line in lines)


def test_services_not_seen_recently_are_named_with_their_silence(
    db_url: str, engine_at: Engine, tmp_path: Path
) -> None:
    ServiceBeat(engine_at, ServiceKind.LISTENER).beat()
    ServiceBeat(engine_at, ServiceKind.WORKER).beat(utcnow() - timedelta(minutes=10))
    code, status = _status(_env(db_url, tmp_path, "memory://"))
    assert code == 2 and _checks(status) == {"worker": "down"}
    [problem] = status["problems"]
    assert problem["message"] == "no worker (ctdx worker) seen for 10 min"


def test_backlog_stale_claims_and_exports_are_degraded(
    db_url: str, engine_at: Engine, tmp_path: Path
) -> None:
    _alive(engine_at)
    now = utcnow()
    long_ago = now - timedelta(hours=2)
    waiting = _version(engine_at, "complete", now)
    queued = _version(engine_at, "queued", now)
    processing = _version(engine_at, "processing", now)
    with session_scope(engine_at) as session:
        session.add(OutboxEntry(study_version_id=waiting, created_at=long_ago,
                                next_attempt_at=now, attempts=40))
        session.add(OutboxEntry(study_version_id=queued, created_at=long_ago,
                                dispatched_at=long_ago, next_attempt_at=long_ago))
        analysis = Analysis(study_version_id=processing, state="running", model_name="m",
                            model_version="1", model_uid="2.25.1", worker="h:1/x",
                            claimed_at=long_ago, heartbeat_at=long_ago)
        session.add(analysis)
        session.flush()
        for n, (state, due) in enumerate((("dead", now), ("pending", long_ago))):
            session.add(Export(analysis_id=analysis.id, kind="sr", destination="PACS@h:104",
                               sop_instance_uid=f"2.25.{n}", path="r.dcm", state=state,
                               attempts=1, created_at=long_ago, next_attempt_at=due))
    env = _env(db_url, tmp_path, "memory://")
    code, status = _status(env)
    assert code == 1 and status["status"] == "degraded"
    assert _checks(status) == {"outbox": "degraded", "queue": "degraded",
                               "claims": "degraded", "exports": "degraded"}
    messages = " | ".join(p["message"] for p in status["problems"])
    assert "1 completed study version(s) waiting in the outbox, the oldest for 2.0 h" in messages
    assert "1 report(s) dead-lettered" in messages and "1 report(s) overdue" in messages
    n = status["numbers"]
    assert (n["outbox_waiting"], n["queued_unclaimed_overdue"], n["stale_claims"]) == (1, 1, 1)
    assert n["exports_by_state"] == {"dead": 1, "pending": 1} and n["exports_overdue"] == 1
    assert n["oldest_undelivered_seconds"] == pytest.approx(7200, abs=60)
    table = flat(ctdx("status", env=env).stdout)
    assert "ctdx exports retry --dead" in table and "start ctdx worker" in table
    # the thresholds are the settings: a backlog younger than the alert is not a problem
    code, status = _status({**env, "CTDX_OUTBOX_ALERT_SECONDS": "10000",
                            "CTDX_QUEUED_TIMEOUT": "10000", "CTDX_CLAIM_TIMEOUT": "10000"})
    assert code == 1 and _checks(status) == {"exports": "degraded"}


def test_disk_under_the_guard_is_down(db_url: str, engine_at: Engine, tmp_path: Path) -> None:
    _alive(engine_at)
    env = _env(db_url, tmp_path, "memory://", CTDX_MIN_FREE_BYTES=str(10**18))
    code, status = _status(env)
    assert code == 2 and _checks(status) == {"disk": "down"}
    assert "below the guard CTDX_MIN_FREE_BYTES" in status["problems"][0]["message"]


def test_database_absent_or_behind_is_down(sqlite_url: str, tmp_path: Path) -> None:
    absent = f"sqlite:///{tmp_path / 'nowhere' / 'ctdx.sqlite3'}"
    code, status = _status(_env(absent, tmp_path, "memory://"))
    assert code == 2 and status["numbers"] is None
    assert _checks(status)["database"] == "down"
    assert not (tmp_path / "nowhere" / "ctdx.sqlite3").exists()  # status never creates it

    command.downgrade(migrate.alembic_config(sqlite_url), "0006")
    code, status = _status(_env(sqlite_url, tmp_path, "memory://"))
    assert code == 2
    database = next(p for p in status["problems"] if p["check"] == "database")
    assert "0006" in database["message"] and "ctdx db upgrade" in database["action"]


def test_postgres_unreachable_is_down(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/ctdx?connect_timeout=3"
    code, status = _status(_env(url, tmp_path, "memory://"))
    assert code == 2 and _checks(status)["database"] == "down"
    assert re.search(r"database unreachable", status["problems"][0]["message"])


def test_status_json_fields_are_documented_in_order(db_url: str, tmp_path: Path) -> None:
    from tests.cli.test_docs import _fields

    _code, status = _status(_env(db_url, tmp_path, "memory://"))
    assert list(status) == _fields("`ctdx status`")
    assert list(status["problems"][0]) == _fields("status problem")
    assert list(status["numbers"]) == _fields("status numbers")
