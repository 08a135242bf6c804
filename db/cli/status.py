"""``ctdx status``: one command for a monitoring system and for a person.

Exit 0 healthy, 1 degraded, 2 down; one line per problem with what to do
(``--format json``: docs/cli-json.md). Checks the database (reachable, at the
code's migration), the broker, the disk under the data dir, the services'
heartbeats, the outbox, the queue, stale claims and the exports
(:mod:`ctdx.db.health`).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from enum import StrEnum
from typing import Any

import typer
from sqlalchemy.exc import ArgumentError, DBAPIError

from ctdx.db import health, migrate
from ctdx.db.cli.common import DatabaseUrlOption, revision_problem, sqlite_path
from ctdx.db.cli.output import iso_utc
from ctdx.db.health import Health, PipelineNumbers, Problem
from ctdx.db.models import ServiceKind, utcnow
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings, load_settings

STATUS_FIELDS = ("status", "checked_at", "problems", "numbers")
PROBLEM_FIELDS = ("check", "severity", "message", "action")


class StatusFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


def register(app: typer.Typer) -> None:
    """Add ``ctdx status`` to the root app."""
    app.command("status")(status_command)


def _database(settings: Settings) -> tuple[PipelineNumbers | None, Problem | None]:
    url = settings.resolved_database_url
    try:
        path = sqlite_path(url)
    except ArgumentError:
        return None, Problem("database", Health.DOWN, "CTDX_DATABASE_URL is not a database URL",
                             "fix CTDX_DATABASE_URL")
    if path is not None and not path.is_file():
        return None, Problem("database", Health.DOWN, f"no database at {path}",
                             "run ctdx db upgrade, or point CTDX_DATABASE_URL at the database")
    engine = make_engine(url)
    try:
        current = migrate.current_revision(engine)
        behind = revision_problem(current, migrate.head_revision())
        if behind is not None:
            return None, Problem("database", Health.DOWN, behind.split(":")[0],
                                 behind.split(": ", 1)[-1])
        with session_scope(engine) as session:
            return health.pipeline_numbers(session, settings, utcnow()), None
    except DBAPIError as exc:
        detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc)
        return None, Problem("database", Health.DOWN, f"database unreachable ({detail})",
                             "start the database server or fix CTDX_DATABASE_URL; the listener "
                             "refuses studies (0xA701) while it is down")
    finally:
        engine.dispose()


def check(settings: Settings) -> tuple[Health, list[Problem], PipelineNumbers | None]:
    """Every check once; the overall health, the problems and the numbers (None: no database)."""
    numbers, db_problem = _database(settings)
    try:
        disk: int | None = health.free_bytes(settings.data_dir)
    except OSError:
        disk = None
    broker = health.broker_problem(settings)
    problems = [db_problem] if db_problem else []
    if numbers is not None:
        problems += health.assess(settings, numbers, broker, disk)
    else:  # no numbers without the database; the probes still say what they see
        empty = PipelineNumbers(0, None, 0, 0, {}, 0, {}, 0, None,
                                {k.value: 0.0 for k in ServiceKind})
        problems += health.assess(settings, empty, broker, disk)
    problems.sort(key=lambda p: 0 if p.severity is Health.DOWN else 1)
    return health.overall(problems), problems, numbers


def status_json(state: Health, problems: list[Problem], numbers: PipelineNumbers | None,
                at: datetime) -> dict[str, Any]:
    return {
        "status": state.value,
        "checked_at": iso_utc(at),
        "problems": [
            {"check": p.check, "severity": p.severity.value, "message": p.message,
             "action": p.action}
            for p in problems
        ],
        "numbers": health.numbers_dict(numbers) if numbers is not None else None,
    }


FormatOption = typer.Option(
    StatusFormat.TABLE, "--format", "-f", help="table (one line per problem) or json."
)


def status_command(
    output: StatusFormat = FormatOption,
    database_url: str | None = DatabaseUrlOption,
) -> None:
    """Is ctdx healthy? Exit 0 healthy, 1 degraded, 2 down; a line per problem.

    Checks: the database, the broker, free disk under the data dir,
    a listener and a worker seen in the last 90 s, the outbox,
    studies queued but not taken, stale claims, dead and overdue reports.
    """
    settings = load_settings(database_url=database_url)
    at = utcnow()
    state, problems, numbers = check(settings)
    if output is StatusFormat.JSON:
        json.dump(status_json(state, problems, numbers, at), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        typer.echo(f"ctdx {state.value}" + (f": {len(problems)} problem(s)" if problems else ""))
        for p in problems:
            typer.echo(f"{p.severity.value.upper():9s}{p.check}: {p.message}. Do: {p.action}")
        if numbers is not None:
            waiting = numbers.outbox_waiting + numbers.versions_by_state.get("queued", 0)
            typer.echo(
                f"studies waiting {waiting} (outbox {numbers.outbox_waiting}), processing "
                f"{numbers.versions_by_state.get('processing', 0)}, reports pending "
                f"{numbers.exports_by_state.get('pending', 0)}"
            )
    raise typer.Exit(state.exit_code)
