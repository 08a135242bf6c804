"""After a database outage the first instance is accepted (a private PostgreSQL, stopped and
started again; the shared one is never touched)."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from ctdx.db import migrate
from tests.conftest import free_port, wait_for
from tests.scp.conftest import Running, phantom, send_files


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of this test alone, run as the ``postgres`` user when we are root."""

    directory: Path
    port: int
    bin_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-w", "-t", "60",
                  "-l", str(self.directory / "log"),
                  "-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1",
                  "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-w", "-m", "fast", "stop")

    def clients(self) -> int:
        """Client connections to the server, other than the one asking."""
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                return int(connection.execute(text(
                    "select count(*) from pg_stat_activity where backend_type = 'client backend'"
                    " and pid <> pg_backend_pid()")).scalar() or 0)
        finally:
            engine.dispose()

    def accepts(self) -> bool:
        engine = create_engine(self.url)
        try:
            with engine.connect() as connection:
                return connection.execute(text("select 1")).scalar() == 1
        except Exception:
            return False
        finally:
            engine.dispose()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        pytest.skip("PostgreSQL server binaries not installed")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser")
    directory = Path(tempfile.mkdtemp(prefix="ctdx-pg-"))
    directory.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    server = PrivatePostgres(directory, free_port(), Path(candidates[-1]).parent)
    try:
        server._run("initdb", "-D", str(directory / "data"), "-A", "trust", "-U", "postgres",
                    "--no-sync")
        server.start()
        yield server
    finally:
        try:
            server.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(directory, ignore_errors=True)


def test_first_instance_after_the_database_returns_is_accepted(
    private_postgres: PrivatePostgres, start_scp_sqlite: Callable[..., Running], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    migrate.upgrade(private_postgres.url)
    scp = start_scp_sqlite(database_url=private_postgres.url)
    series = phantom(tmp_path, n_slices=3, size=32)
    caplog.set_level(logging.INFO)
    recorder = scp.service.listener.store.recorder
    recorder.pause(True)  # acknowledged, row not yet written when the database goes
    assert send_files(scp.port, series.paths[:1]) == [0x0000]
    private_postgres.stop()
    recorder.pause(False)
    # the recorder's retries back off to 5 s: wait until they are that far apart
    wait_for(lambda: caplog.text.count("database refused") >= 4, timeout=60,
             message="the recorder retried several times")
    assert not recorder.healthy
    assert send_files(scp.port, series.paths[1:2]) == [0xA701]  # still down: refused
    private_postgres.start()
    assert private_postgres.accepts()
    # the very first instance after the database is back is accepted
    assert send_files(scp.port, series.paths[2:]) == [0x0000]
    wait_for(lambda: scp.instance_count() == 2, timeout=30, message="both rows")
    stored = {p.stem for p in scp.spool_files()}
    assert stored == {series.sop_instance_uids[0], series.sop_instance_uids[2]}


def test_a_stopped_listener_leaves_no_database_connection_open(
    private_postgres: PrivatePostgres, start_scp_sqlite: Callable[..., Running], tmp_path: Path,
) -> None:
    """The listener's pools (its look-up has one of its own) are closed when it stops."""
    migrate.upgrade(private_postgres.url)
    scp = start_scp_sqlite(database_url=private_postgres.url)
    series = phantom(tmp_path, n_slices=2, size=32)
    assert send_files(scp.port, series.paths) == [0x0000] * 2
    wait_for(lambda: scp.instance_count() == 2, timeout=30, message="both rows")
    assert private_postgres.clients() > 0
    scp.service.stop()
    scp.engine.dispose()
    wait_for(lambda: private_postgres.clients() == 0, timeout=30,
             message=f"no connection left (still {private_postgres.clients()})")
