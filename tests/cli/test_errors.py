"""Clear messages and exit codes: missing, unreachable or outdated database, bad dates.

Also through the installed `ctdx` script, which prints one red line and no
traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import Result

from ctdx.cli import app
from ctdx.db import migrate
from ctdx.db.session import make_engine
from tests.cli.conftest import Filled, fill, flat
from tests.cli.conftest import ctdx as ctdx_80


def ctdx(*args: str, env: dict[str, str] | None = None) -> Result:
    """Error panels fold long paths at the terminal's width: check messages on a wide one."""
    return ctdx_80(*args, columns=400, env=env)


EVERY_COMMAND = [
    ["results", "list"],
    ["results", "list", "-f", "json"],
    ["results", "show", "1.2.3"],
    ["results", "stats"],
    ["studies", "requeue", "1.2.3"],
    ["exports", "list", "-f", "csv"],
    ["exports", "retry", "--dead"],
    ["db", "check"],
]


@pytest.mark.parametrize("args", EVERY_COMMAND, ids=lambda a: "-".join(a))
def test_missing_sqlite_database_is_not_created(tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "absent" / "ctdx.sqlite3"
    result = ctdx(*args, "--database-url", f"sqlite:///{path}")
    assert result.exit_code == 3, result.output
    assert f"no database at {path}" in flat(result.stderr)
    assert "ctdx db upgrade" in flat(result.stderr)
    assert result.stdout == ""
    assert not path.exists() and not path.parent.exists()


def test_database_url_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.sqlite3"
    result = ctdx("results", "list", env={"CTDX_DATABASE_URL": f"sqlite:///{path}"})
    assert result.exit_code == 3 and str(path) in flat(result.stderr)
    data_dir = tmp_path / "data"
    result = ctdx("results", "list", env={"CTDX_DATA_DIR": str(data_dir)})
    assert result.exit_code == 3 and "ctdx.sqlite3" in flat(result.stderr)
    assert not data_dir.exists()


def test_upgrade_creates_and_check_accepts(tmp_path: Path) -> None:
    path = tmp_path / "new" / "ctdx.sqlite3"
    url = f"sqlite:///{path}"
    upgraded = ctdx("db", "upgrade", "--database-url", url)
    assert upgraded.exit_code == 0 and path.is_file()
    checked = ctdx("db", "check", "--database-url", url)
    assert checked.exit_code == 0 and "at revision" in checked.stdout
    listed = ctdx("results", "list", "--database-url", url)
    assert listed.exit_code == 0 and "No studies match" in listed.stdout


@pytest.mark.parametrize("args", EVERY_COMMAND, ids=lambda a: "-".join(a))
def test_database_behind_the_code_exits_3(tmp_path: Path, args: list[str]) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    migrate.upgrade(url, "0003")
    result = ctdx(*args, "--database-url", url)
    assert result.exit_code == 3, result.output
    message = flat(result.stderr)
    assert "database is at revision 0003" in message and migrate.head_revision() in message
    assert "run `ctdx db upgrade`" in message


def test_empty_and_newer_databases_exit_3(tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    result = ctdx("results", "list", "--database-url", f"sqlite:///{empty}")
    assert result.exit_code == 3 and "revision none (empty)" in flat(result.stderr)

    url = f"sqlite:///{tmp_path / 'newer.sqlite3'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    for args in (["results", "stats"], ["db", "check"]):
        result = ctdx(*args, "--database-url", url)
        assert result.exit_code == 3
        assert "newer than the installed ctdx" in flat(result.stderr)


def test_unreachable_postgresql_exits_3() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/ctdx?connect_timeout=2"
    for args in (["results", "list"], ["db", "check"]):
        result = ctdx(*args, "--database-url", url)
        assert result.exit_code == 3
        assert "cannot use the database" in flat(result.stderr)


def test_missing_postgresql_database_exits_3(postgres_url: str) -> None:
    url = postgres_url.rsplit("/", 1)[0] + "/ctdx_no_such_database"
    result = ctdx("results", "list", "--database-url", url)
    assert result.exit_code == 3
    assert 'database "ctdx_no_such_database" does not exist' in flat(result.stderr)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "2026-13-01"], "'2026-13-01' is not a valid date (month must be in 1..12)"),
        (["--since", "2026-02-30"], "'2026-02-30' is not a valid date"),
        (["--until", "next tuesday"], "'next tuesday' is not a date or time"),
        (["--since", "7x"], "'7x' is not a date or time"),
        (["--since", "today", "--until", "2020-01-01"], "must be before --until"),
    ],
)
def test_bad_dates_exit_2(filled: Filled, args: list[str], message: str) -> None:
    for command in (["results", "list"], ["results", "stats"], ["exports", "list"]):
        result = ctdx(*command, *args, "--database-url", filled.url)
        assert result.exit_code == 2, result.output
        assert message in flat(result.stderr)
        assert "24h" in flat(result.stderr) or "--until" in message


def test_bad_choices_exit_2(filled: Filled) -> None:
    for args in (["results", "list", "--status", "bogus"], ["exports", "list", "--state", "x"],
                 ["results", "list", "--format", "xml"], ["results", "show", "A", "-f", "csv"],
                 ["results", "list", "--limit", "0"]):
        result = ctdx(*args, "--database-url", filled.url)
        assert result.exit_code == 2, args


def test_tracebacks_never_show_local_variables() -> None:
    assert app.pretty_exceptions_show_locals is False


def _script() -> str:
    found = shutil.which("ctdx", path=str(Path(sys.executable).parent)) or shutil.which("ctdx")
    if found is None:
        pytest.skip("the ctdx script is not installed (pip install -e .)")
    return found


def test_installed_script_prints_one_line_errors(tmp_path: Path, sqlite_url: str) -> None:
    filled = Filled(sqlite_url, fill(sqlite_url))
    env = {**os.environ, "COLUMNS": "80", "CTDX_DATA_DIR": str(tmp_path / "data")}
    env.pop("CTDX_DATABASE_URL", None)
    cases = [
        (["results", "list"], 3, "error: no database at"),
        (["results", "show", "1.2.3", "--database-url", filled.url], 4, "error: no study with"),
        (["results", "list", "--since", "2026-13-01", "--database-url", filled.url], 2,
         "error: '2026-13-01' is not a valid date"),
        (["results", "list", "--status", "bogus"], 2, "Invalid value for '--status'"),
        (["exports", "retry", "1", "--dead", "--database-url", filled.url], 2,
         "error: give an export ID or --dead"),
    ]
    for args, code, message in cases:
        done = subprocess.run([_script(), *args], capture_output=True, text=True, env=env,
                              timeout=60, check=False)
        assert done.returncode == code, (args, done.stderr)
        assert message in " ".join(done.stderr.split()), (args, done.stderr)
        assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "data").exists()


def test_unknown_decision_is_a_usage_error(filled: Filled) -> None:
    result = ctdx("results", "list", "--decision", "covid-19", "--database-url", filled.url)
    assert result.exit_code == 2
    assert "'covid-19' is not one of covid19, other_pneumonia, normal" in flat(result.stderr)
    upper = ctdx("results", "list", "--decision", "COVID19", "-f", "json",
                 "--database-url", filled.url)
    assert upper.exit_code == 0 and '"decision": "covid19"' in upper.stdout
