"""CLI fixtures: databases filled with :mod:`tests.cli.factories`, and a runner for `ctdx`.

Read-only tests share one filled database per module and backend (SQLite
file, PostgreSQL service); tests that change state get their own (``db_url``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

from ctdx.cli import app
from ctdx.db import migrate
from ctdx.db.session import make_engine, session_scope
from tests.cli.factories import Scenario, build_scenario
from tests.conftest import POSTGRES_ADMIN_URL, _postgres_available


@dataclass(frozen=True)
class Filled:
    url: str
    scenario: Scenario


def fill(url: str) -> Scenario:
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            return build_scenario(session)
    finally:
        engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Filled]:
    """One migrated database with the scenario, shared by a module's read-only tests."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('cli') / 'ctdx.sqlite3'}"
        migrate.upgrade(url)
        yield Filled(url, fill(url))
        return
    if not _postgres_available():
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}")
    name = f"ctdx_cli_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield Filled(url, fill(url))
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def scenario_db(db_url: str) -> Filled:
    """A database of this test's own (SQLite and PostgreSQL), filled with the scenario."""
    return Filled(db_url, fill(db_url))


def ctdx(*args: str, columns: int = 80, env: dict[str, str] | None = None) -> Result:
    """Run `ctdx ARGS` in-process as a user would, on a terminal ``columns`` wide."""
    runner = CliRunner()
    return runner.invoke(app, list(args), env={"COLUMNS": str(columns), **(env or {})})


_BOX = re.compile(r"[│╭╮╰╯─]+")


def flat(text_: str) -> str:
    """Output with Rich's panel borders and line breaks removed, for phrase matching."""
    return " ".join(_BOX.sub(" ", text_).split())


@pytest.fixture
def missing_sqlite(tmp_path: Path) -> Path:
    return tmp_path / "nowhere" / "ctdx.sqlite3"
