"""`ctdx scp` as an operator runs it: refusals, kill -9 and restart, several processes."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from ctdx.cli import app
from ctdx.db.models import Instance, ReceivingLease, StudyVersion, VersionState
from ctdx.db.session import make_engine, session_scope
from tests.conftest import free_port, wait_for
from tests.scp.conftest import (
    associate,
    chunked_send,
    phantom,
    send_files,
    status_of,
    transfer_syntax_of,
    version_states,
)

CTDX = [sys.executable, "-c", "from ctdx.cli import main; main()"]


def test_refuses_a_database_that_is_not_at_head(tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite3"
    sqlite3.connect(empty).close()  # a database with no schema
    runner = CliRunner()
    result = runner.invoke(app, ["scp", "--database-url", f"sqlite:///{empty}",
                                 "--port", str(free_port())])
    assert result.exit_code == 3
    assert "run `ctdx db upgrade`" in result.output
    missing = runner.invoke(app, ["scp", "--data-dir", str(tmp_path / "nowhere"),
                                  "--port", str(free_port())])
    assert missing.exit_code == 3 and "ctdx db upgrade" in missing.output


def test_bad_settings_are_one_line_errors(tmp_path: Path, sqlite_url: str) -> None:
    result = CliRunner().invoke(app, ["scp", "--database-url", sqlite_url, "--port", "70000"])
    assert result.exit_code == 2 and "port" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["scp", "--database-url", sqlite_url,
                                      "--tls-cert", str(tmp_path / "missing.pem")])
    assert result.exit_code == 2 and "TLS" in result.output


class Listener:
    """A `ctdx scp` subprocess; its log is a file the test can read."""

    def __init__(self, data_dir: Path, database_url: str, port: int, *args: str,
                 env: Mapping[str, str] | None = None) -> None:
        self.log = data_dir.parent / f"scp-{port}-{len(list(data_dir.parent.glob('scp-*')))}.log"
        env = {**os.environ, "CTDX_DATA_DIR": str(data_dir), "CTDX_DATABASE_URL": database_url,
               "CTDX_BROKER_URL": "memory://", "CTDX_HOST": "127.0.0.1",
               "CTDX_MIN_FREE_BYTES": "0", **(env or {})}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [*CTDX, "scp", "--port", str(port), *args], env=env, stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.port = port
        wait_for(self._ready, timeout=60, message="ctdx scp listening")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"ctdx scp exited: {self.text()}")
        return "listening on" in self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@contextmanager
def running(*args: str, **kwargs: object) -> Iterator[Listener]:
    listener = Listener(*args, **kwargs)  # type: ignore[arg-type]
    try:
        yield listener
    finally:
        if listener.process.poll() is None:
            listener.process.kill()
            listener.process.wait(timeout=30)


@pytest.mark.slow
def test_kill_9_mid_study_then_restart_and_resend_loses_nothing(
    tmp_path: Path, db_url: str
) -> None:
    data_dir = tmp_path / "data"
    study = phantom(tmp_path, n_slices=10)
    port = free_port()
    with running(data_dir, db_url, port, "--quiet-seconds", "1.5") as first:
        with chunked_send(), associate(port, [transfer_syntax_of(study.paths[0])]) as assoc:
            for path in study.paths[:5]:
                assert status_of(assoc.send_c_store(path)) == 0x0000
            first.process.send_signal(signal.SIGKILL)  # mid-study, association open
            first.process.wait(timeout=30)
    # what a crash can leave: an interrupted transfer's temporary file
    leftover = data_dir / "spool" / ".incoming" / "rx-interrupted.dcm"
    leftover.write_bytes(b"\x00" * 1000)
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            assert s.scalars(select(ReceivingLease)).all()  # the dead process's lease
        with running(data_dir, db_url, port, "--quiet-seconds", "1.5") as second:
            assert not leftover.exists()
            with session_scope(engine) as s:
                assert s.scalars(select(ReceivingLease)).all() == []
                assert s.scalars(select(StudyVersion)).one().state == VersionState.RECEIVING
            assert send_files(port, study.paths[5:]) == [0x0000] * 5  # the sender resends
            wait_for(lambda: version_states(engine) == [VersionState.QUEUED], timeout=30,
                     message="the whole study complete and queued")
            assert second.stop() == 0
        with session_scope(engine) as s:
            version = s.scalars(select(StudyVersion)).one()
            stored = {i.sop_instance_uid: i.path for i in s.scalars(select(Instance))}
        assert version.instance_count == 10 and set(stored) == set(study.sop_instance_uids)
        assert all((data_dir / "spool" / p).is_file() for p in stored.values())
    finally:
        engine.dispose()




@pytest.mark.slow
def test_several_processes_share_the_port_and_die_with_the_primary(
    tmp_path: Path, sqlite_url: str
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    studies = [phantom(tmp_path, f"s{i}", n_slices=3) for i in range(4)]
    with running(data_dir, sqlite_url, port, "--processes", "2", "--quiet-seconds", "1") as scp:
        wait_for(lambda: "listener process 2 of 2 running" in scp.text(), timeout=60,
                 message="second process up")
        child_pid = int(re.search(r"INFO ctdx\.scp\.server (\d+): listener process 2 of 2",
                                  scp.text()).group(1))  # type: ignore[union-attr]
        results: list[list[int]] = []
        threads = [threading.Thread(target=lambda s=s: results.append(send_files(port, s.paths)))
                   for s in studies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(results) == [[0x0000] * 3] * 4
        engine = make_engine(sqlite_url)
        try:
            wait_for(lambda: version_states(engine) == [VersionState.QUEUED] * 4, timeout=30,
                     message="four studies complete")
        finally:
            engine.dispose()
        scp.process.send_signal(signal.SIGKILL)
        scp.process.wait(timeout=30)
        wait_for(lambda: not _alive(child_pid), timeout=30, message="secondary exits too")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
