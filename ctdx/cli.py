"""The ``ctdx`` command: one sub-command per noun, each owned by its package.

This module sits above every package: it imports each one's ``register(app)``, and nothing
of ctdx imports it. User errors become a one-line message and a non-zero exit code;
tracebacks never show local variables (they may hold PHI).
"""

from __future__ import annotations

import sys

import click
import typer
from rich.console import Console
from rich.markup import escape

from ctdx.db.cli.common import UserError

__all__ = ["app", "main"]

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

err = Console(stderr=True, soft_wrap=True)


def _register_subcommands() -> None:
    """Each package adds its nouns; their modules import heavy libraries lazily."""
    from ctdx.db import cli as db_cli
    from ctdx.db.cli.help import tidy_help
    from ctdx.model_train import cli as train_cli
    from ctdx.scp import cli as scp_cli
    from ctdx.scp import cli_spool
    from ctdx.worker import cli as worker_cli
    from ctdx.worker import demo, selftest

    tidy_help()
    demo.register(app)
    selftest.register(app)
    scp_cli.register(app)
    cli_spool.register(app)
    worker_cli.register(app)
    db_cli.register(app)
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
