"""`ctdx selftest` against a running installation: `ctdx scp` and `ctdx worker` processes.

Embedded broker (kombu's filesystem transport), SQLite, the small random-weight
checkpoints of the worker tests (biased to COVID-19, so a real study would
alert). The configured PACS is a closed port: a test study's report that went
there would never be delivered. A webhook receiver is configured too: test
studies must not alert.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from ctdx.db import migrate
from ctdx.db.models import Alert, Export, Study
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings
from ctdx.worker.demo import settings_environment
from tests.conftest import REPO_ROOT, free_port, wait_for
from tests.worker.alert_receiver import Receiver
from tests.worker.conftest import (  # noqa: F401  (fixtures)
    Checkpoints,
    analysis_settings,
    checkpoints,
    small_rules,
)

CTDX = [sys.executable, "-c", "from ctdx.cli import main; main()"]
STAGES = ["echo", "stand-in PACS", "send", "received", "analysed", "report delivered"]


@dataclass
class Installation:
    settings: Settings
    env: dict[str, str]
    receiver: Receiver
    listener: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    logs: Path

    def selftest(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CTDX, "selftest", "--slices", "8", "--size", "128", *args],
                              cwd=REPO_ROOT, env=self.env, text=True, capture_output=True,
                              timeout=timeout + 60, check=False)

    def log_tail(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.logs.glob("*.log")))


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen([*CTDX, *args], cwd=REPO_ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def installation(tmp_path: Path, checkpoints: Checkpoints,  # noqa: F811
                 small_rules: Path) -> Iterator[Installation]:  # noqa: F811
    receiver = Receiver(free_port()).start()
    url = f"sqlite:///{tmp_path / 'data' / 'ctdx.sqlite3'}"
    settings = analysis_settings(
        tmp_path / "data", url, checkpoints, small_rules, broker_url="embedded",
        host="127.0.0.1", port=free_port(), quiet_seconds=2.0, outbox_poll_seconds=0.5,
        min_free_bytes=0, pacs_host="127.0.0.1", pacs_port=free_port(),
        export_backoff_seconds=1.0, alert_webhook_urls=receiver.url, prune_interval_seconds=0)
    migrate.upgrade(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTDX_")}
    env.update(settings_environment(settings))
    logs = tmp_path / "logs"
    logs.mkdir()
    listener = _spawn(["scp"], env, logs / "scp.log")
    worker = _spawn(["worker", "--pool", "solo", "--loglevel", "INFO"], env, logs / "worker.log")
    inst = Installation(settings, env, receiver, listener, worker, logs)
    try:
        def up() -> bool:
            for proc in (listener, worker):
                if proc.poll() is not None:
                    raise AssertionError(f"a service exited:\n{inst.log_tail()}")
            with socket.socket() as probe:
                listening = probe.connect_ex(("127.0.0.1", settings.port)) == 0
            return listening and "ready." in (logs / "worker.log").read_text(errors="replace")

        wait_for(up, timeout=240, interval=0.5, message="the listener and the worker")
        yield inst
    finally:
        _stop(worker)
        _stop(listener)
        receiver.stop()


@pytest.mark.slow
def test_selftest_passes_against_a_running_listener_and_worker(installation: Installation
                                                               ) -> None:
    done = installation.selftest("--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr + installation.log_tail()
    result = json.loads(done.stdout)
    assert result["ok"] is True
    assert [s["name"] for s in result["stages"]] == STAGES
    assert all(s["ok"] and s["seconds"] >= 0 for s in result["stages"])
    assert result["report_destination"].startswith("CTDXSELFTESTPACS@127.0.0.1:")
    uid = result["study_instance_uid"]

    engine = make_engine(installation.settings.resolved_database_url)
    try:
        with session_scope(engine) as s:
            assert s.scalar(select(Study.patient_id)
                            .where(Study.study_instance_uid == uid)) == "CTDX-SELFTEST"
            destinations = set(s.scalars(select(Export.destination)))
            assert destinations == {result["report_destination"]}  # never the real PACS
            assert s.scalars(select(Alert)).all() == []  # a test study never alerts
        assert installation.receiver.received == []
    finally:
        engine.dispose()

    stats = subprocess.run([*CTDX, "results", "stats", "--format", "json"], cwd=REPO_ROOT,
                           env=installation.env, text=True, capture_output=True, check=True)
    assert json.loads(stats.stdout)["study_versions"] == 0  # left out of statistics

    again = installation.selftest()  # a second run is a new study, and the table says PASS
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("PASS") == len(STAGES) and "selftest passed" in again.stdout
    assert uid not in again.stdout


@pytest.mark.slow
def test_selftest_fails_clearly_when_the_worker_is_stopped(installation: Installation
                                                           ) -> None:
    _stop(installation.worker)
    done = installation.selftest("--timeout", "25")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name in ("echo", "stand-in PACS", "send", "received"):
        assert any(line.startswith("PASS") and name in line for line in lines), done.stdout
    failed = next(line for line in lines if line.startswith("FAIL"))
    assert "analysed" in failed and "is a worker running" in failed
    assert "selftest FAILED" in done.stdout

    as_json = json.loads(installation.selftest("--timeout", "20", "-f", "json").stdout)
    assert as_json["ok"] is False and as_json["stages"][-1]["name"] == "analysed"


@pytest.mark.slow
def test_selftest_fails_at_the_first_stage_without_a_listener(installation: Installation
                                                              ) -> None:
    _stop(installation.listener)
    wait_for(lambda: installation.listener.poll() is not None, timeout=30)
    done = installation.selftest("--format", "json", "--timeout", "20")
    assert done.returncode == 1
    stages = json.loads(done.stdout)["stages"]
    assert [(s["name"], s["ok"]) for s in stages] == [("echo", False)]
    assert "is `ctdx scp` running" in stages[0]["detail"]


def _documented(heading: str) -> list[str]:
    from tests.cli.test_docs import _fields

    return _fields(heading)


def test_json_fields_are_documented_in_order() -> None:
    from ctdx.worker.selftest import Run, Stage, run_json

    run = Run(stages=[Stage("echo", True, 0.1, "ok")])
    value = run_json(run)
    assert list(value) == _documented("`ctdx selftest`")
    assert list(value["stages"][0]) == _documented("stage")


def test_test_studies_are_left_out_of_statistics_and_drift(sqlite_url: str) -> None:
    import uuid

    from ctdx.db.models import Analysis, StudyVersion, utcnow
    from ctdx.db.validation_db import PeriodUnit, drift
    from tests.cli.conftest import ctdx as ctdx_in_process

    engine = make_engine(sqlite_url)
    try:
        with session_scope(engine) as s:
            for patient_id in ("CTDX-SELFTEST", "PID-1"):
                study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}",
                              patient_id=patient_id)
                s.add(study)
                s.flush()
                version = StudyVersion(study_id=study.id, version=1, state="analysed")
                s.add(version)
                s.flush()
                s.add(Analysis(study_version_id=version.id, state="analysed", model_name="m",
                               model_version="1", model_uid="2.25.1", decision="covid19",
                               fraction_covid19=0.5, finished_at=utcnow()))
        result = ctdx_in_process("results", "stats", "-f", "json", "--database-url", sqlite_url)
        assert result.exit_code == 0, result.output
        stats = json.loads(result.stdout)
        assert stats["study_versions"] == 1 and stats["by_decision"] == {"covid19": 1}
        with session_scope(engine) as s:
            assert [p.studies for p in drift(s, PeriodUnit.WEEK).periods] == [1]
    finally:
        engine.dispose()
