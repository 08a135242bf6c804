"""The ``ctdx`` command: one sub-command per noun, each owned by its package.

User errors become a one-line message and a non-zero exit code; tracebacks
never show local variables (they may hold PHI).
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from sqlalchemy.exc import OperationalError

from db import migrate
from db.settings import load_settings

app = typer.Typer(
    name="ctdx",
    help="ctdx: a second reader for COVID-19 on chest CT (Chen et al. 2021). "
    "Settings come from CTDX_* environment variables (see the README); flags override them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
db_app = typer.Typer(help="Results database: migrations and health.", no_args_is_help=True)
app.add_typer(db_app, name="db")

err = Console(stderr=True, soft_wrap=True)


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


DatabaseUrlOption = typer.Option(
    None, "--database-url", help="SQLAlchemy URL (default: CTDX_DATABASE_URL or SQLite in the data dir)."
)


@db_app.command("upgrade")
def db_upgrade(database_url: str | None = DatabaseUrlOption) -> None:
    """Create or migrate the database to the newest schema (safe to run again)."""
    url = load_settings(database_url=database_url).resolved_database_url
    try:
        migrate.upgrade(url)
    except OperationalError as exc:
        raise UserError(f"cannot reach the database: {exc.orig}") from None
    typer.echo(f"database at revision {migrate.head_revision()}")


@db_app.command("check")
def db_check(database_url: str | None = DatabaseUrlOption) -> None:
    """Exit 0 when the database is reachable and at the newest revision."""
    url = load_settings(database_url=database_url).resolved_database_url
    try:
        st = migrate.status(url)
    except OperationalError as exc:
        raise UserError(f"cannot reach the database: {exc.orig}") from None
    if not st.at_head:
        raise UserError(
            f"database is at revision {st.current or 'none (empty)'}, code needs {st.head}: "
            "run `ctdx db upgrade`",
            code=3,
        )
    typer.echo(f"ok: database reachable and at revision {st.head}")


def _register_subcommands() -> None:
    """Each package adds its nouns; their modules import heavy libraries lazily."""
    from db import cli_results
    from model_train import cli as train_cli
    from scp import cli as scp_cli
    from worker import cli as worker_cli

    scp_cli.register(app)
    worker_cli.register(app)
    cli_results.register(app)
    train_cli.register(app)


_register_subcommands()


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(exc.code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
