"""Shared fixtures: real databases (SQLite file and PostgreSQL), free ports, shared data.

Environment:
- ``CTDX_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``):
  an admin URL; each test gets its own freshly created database, dropped afterwards.
- ``CTDX_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379``).
- ``CTDX_SHARED_DATA`` (default ``../shared/data`` relative to the repository root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from ctdx.db import migrate
from ctdx.db.session import make_engine

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTDX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
POSTGRES_ADMIN_URL = os.environ.get(
    "CTDX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("CTDX_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Services started by tests serve no metrics unless a test asks (on a free port): the defaults
# 9108/9109 would collide between tests running in parallel.
os.environ.setdefault("CTDX_METRICS_PORT", "0")
os.environ.setdefault("CTDX_WORKER_METRICS_PORT", "0")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need the real series skip where it is absent."""
    if not (SHARED_DATA / "covid-ct-md").is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA} (a user's clone has no ../shared)")
    return SHARED_DATA


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package; .ci/run installs it)")
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ctdx.sqlite3'}"
    migrate.upgrade(url)
    return url


def _postgres_available() -> bool:
    try:
        eng = create_engine(POSTGRES_ADMIN_URL)
        with eng.connect():
            pass
        eng.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, migrated PostgreSQL database for this test, dropped afterwards."""
    if not _postgres_available():
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}")
    name = f"ctdx_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run the test once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def redis_url() -> str:
    """The real Redis service; tests use their own queue names, not FLUSHALL."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception:
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    return REDIS_URL


def stop_process(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM a process the tests started; SIGKILL it if it is not gone within ``timeout`` s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> object:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes (no fixed "
    "sleeps)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)
