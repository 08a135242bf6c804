"""The admin commands over the results database (`ctdx db`, `ctdx results`, ...).

The `ctdx` root that gathers every package's nouns is :mod:`ctdx.cli`.

User errors become a one-line message and a non-zero exit code; tracebacks
never show local variables (they may hold PHI).
"""

from __future__ import annotations

import typer
from rich.console import Console
from sqlalchemy.exc import OperationalError

from ctdx.db import migrate
from ctdx.db.cli.common import (
    EXIT_DATABASE,
    DatabaseUrlOption,
    UserError,
    database_unreachable,
    require_existing_sqlite,
    resolve_database_url,
    revision_problem,
)

__all__ = ["DatabaseUrlOption", "UserError", "register"]

db_app = typer.Typer(help="Results database: migrations and health.", no_args_is_help=True)

err = Console(stderr=True, soft_wrap=True)


@db_app.command("upgrade")
def db_upgrade(database_url: str | None = DatabaseUrlOption) -> None:
    """Create or migrate the database to the newest schema (safe to run again).

    A SQLite file (and its folder) is created when absent; a PostgreSQL
    database must exist (create it with `createdb`).
    """
    url = resolve_database_url(database_url)
    try:
        migrate.upgrade(url)
    except OperationalError as exc:
        raise database_unreachable(exc) from None
    typer.echo(f"database at revision {migrate.head_revision()}")


@db_app.command("check")
def db_check(database_url: str | None = DatabaseUrlOption) -> None:
    """Exit 0 when the database exists, is reachable and is at the newest revision.

    Exit 3 otherwise, with the reason. Never creates a missing SQLite file.
    """
    url = resolve_database_url(database_url)
    require_existing_sqlite(url)
    try:
        st = migrate.status(url)
    except OperationalError as exc:
        raise database_unreachable(exc) from None
    problem = revision_problem(st.current, st.head)
    if problem is not None:
        raise UserError(problem, EXIT_DATABASE)
    typer.echo(f"ok: database reachable and at revision {st.head}")


def register(app: typer.Typer) -> None:
    """Add the nouns over the results database: db, results, studies, exports, status, validate."""
    from ctdx.db.cli import results, status, validate

    app.add_typer(db_app, name="db")
    results.register(app)
    status.register(app)
    validate.register(app)
