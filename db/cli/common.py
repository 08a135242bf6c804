"""What every ``ctdx`` sub-command shares: the user error, exit codes, opening the database.

Kept apart from :mod:`ctdx.db.cli` so that command modules can import it without
importing the root app (which imports them back to register their nouns).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from ctdx.db import migrate
from ctdx.db.session import make_engine
from ctdx.db.settings import load_settings

logger = logging.getLogger(__name__)

# Exit codes, documented in docs/cli-json.md; scripts rely on them.
EXIT_OK = 0
EXIT_USAGE = 2  # bad option or argument (click's own code), bad date
EXIT_DATABASE = 3  # database missing, unreachable, or not at the code's migration
EXIT_NOT_FOUND = 4  # unknown study UID / accession number / export id
EXIT_REFUSED = 5  # the operator action makes no sense in the current state


try:  # Typer >= 0.2x runs on its own copy of click: its commands raise and catch these
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover - Typer on the click package
    from click import ClickException as _ClickException  # type: ignore[assignment]


class UserError(_ClickException):
    """A problem the user can fix; printed as one line, exit code ``code``.

    A ``ClickException`` of the click that Typer runs on, so that Typer's
    standalone mode (and its test runner) prints the message and exits with
    ``code`` instead of showing a traceback; ``ctdx.db.cli.main`` prints it itself.
    """

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = code


DatabaseUrlOption = typer.Option(
    None,
    "--database-url",
    help="SQLAlchemy URL (default: CTDX_DATABASE_URL, else SQLite in CTDX_DATA_DIR).",
    show_default=False,
)


def resolve_database_url(database_url: str | None) -> str:
    """The flag if given, else the settings (environment, config file, default)."""
    return load_settings(database_url=database_url).resolved_database_url


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL; ``None`` for other backends and in-memory databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def require_existing_sqlite(url: str) -> None:
    """Refuse a SQLite URL whose file is absent: connecting would silently create it."""
    try:
        path = sqlite_path(url)
    except ArgumentError as exc:
        raise UserError(f"not a database URL: {exc}", EXIT_USAGE) from None
    if path is not None and not path.is_file():
        raise UserError(
            f"no database at {path}: create it with `ctdx db upgrade` "
            "(or point --database-url / CTDX_DATABASE_URL at the right one)",
            EXIT_DATABASE,
        )


def _known_revision(revision: str) -> bool:
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    try:
        return script.get_revision(revision) is not None
    except Exception:  # alembic raises its own lookup errors for unknown ids
        return False


def revision_problem(current: str | None, head: str) -> str | None:
    """A one-line explanation when ``current`` is not the code's ``head``, else ``None``."""
    if current == head:
        return None
    if current is not None and not _known_revision(current):
        return (
            f"database is at revision {current}, unknown to this ctdx (it needs {head}): "
            "the database is newer than the installed ctdx; upgrade ctdx"
        )
    return (
        f"database is at revision {current or 'none (empty)'}, this ctdx needs {head}: "
        "run `ctdx db upgrade`"
    )


def database_unreachable(exc: DBAPIError) -> UserError:
    """Translate a driver error into a one-line message (no URL: it may hold a password)."""
    detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    return UserError(f"cannot use the database: {detail}", EXIT_DATABASE)


@contextmanager
def open_database(database_url: str | None) -> Iterator[Engine]:
    """An engine on an existing database at the code's migration, disposed afterwards.

    Raises :class:`UserError` (exit 3) when the SQLite file is absent (it is not
    created), the server cannot be reached, or the schema is not at head.
    """
    url = resolve_database_url(database_url)
    require_existing_sqlite(url)
    try:
        engine = make_engine(url)
    except ArgumentError as exc:
        raise UserError(f"not a database URL: {exc}", EXIT_USAGE) from None
    try:
        try:
            current = migrate.current_revision(engine)
        except OperationalError as exc:
            raise database_unreachable(exc) from None
        problem = revision_problem(current, migrate.head_revision())
        if problem is not None:
            raise UserError(problem, EXIT_DATABASE)
        yield engine
    except OperationalError as exc:  # the server went away mid-command
        raise database_unreachable(exc) from None
    finally:
        engine.dispose()
