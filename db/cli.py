"""The ``ctdx`` command: one sub-command per noun, each owned by its package.

User errors become a one-line message and a non-zero exit code; tracebacks
never show local variables (they may hold PHI).
"""

from __future__ import annotations

import sys

import click
import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import OperationalError

from db import migrate
from db.cli_common import (
    EXIT_DATABASE,
    DatabaseUrlOption,
    UserError,
    database_unreachable,
    require_existing_sqlite,
    resolve_database_url,
    revision_problem,
)

__all__ = ["DatabaseUrlOption", "UserError", "app", "main"]

app = typer.Typer(
    name="ctdx",
    help="ctdx: a second reader for COVID-19 on chest CT (Chen et al. 2021). "
    "Settings come from CTDX_* environment variables (see the README); flags override them.",
    epilog="Common questions:\n"
    "What came in today?  ctdx results list --since today\n"
    "COVID-19 positive?   ctdx results list --since today --decision covid19\n"
    "One study in full?   ctdx results show ACCESSION_NUMBER_OR_UID\n"
    "Reports not in PACS? ctdx exports list --state dead\n"
    "Send them again?     ctdx exports retry --dead\n"
    "How is it going?     ctdx results stats --since 7d",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
db_app = typer.Typer(help="Results database: migrations and health.", no_args_is_help=True)
app.add_typer(db_app, name="db")

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


def _register_subcommands() -> None:
    """Each package adds its nouns; their modules import heavy libraries lazily."""
    from db import cli_results, cli_status, cli_validate
    from db.cli_help import tidy_help
    from model_train import cli as train_cli
    from scp import cli as scp_cli
    from scp import cli_spool
    from worker import cli as worker_cli
    from worker import demo, selftest

    tidy_help()
    demo.register(app)
    selftest.register(app)
    scp_cli.register(app)
    cli_spool.register(app)
    worker_cli.register(app)
    cli_results.register(app)
    cli_status.register(app)
    cli_validate.register(app)
    train_cli.register(app)


_register_subcommands()


def main() -> None:
    """Entry point of the ``ctdx`` script: user errors as one red line and their exit code."""
    try:
        rc = app(standalone_mode=False)
    except UserError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(exc.code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except (typer.TyperException, click.ClickException) as exc:  # usage errors, bad values
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err.print(f"error: {escape(exc.format_message())}", highlight=False)
        sys.exit(exc.exit_code)
    # without standalone mode click returns, rather than raises, `typer.Exit(code)`
    if isinstance(rc, int) and not isinstance(rc, bool):
        sys.exit(rc)
