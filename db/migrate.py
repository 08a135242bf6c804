"""Alembic, driven from code: ``ctdx db upgrade`` and ``ctdx db check`` call these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from ctdx.db.session import make_engine

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (creates it for SQLite)."""
    make_engine(url).dispose()  # creates the SQLite file's folder
    command.upgrade(alembic_config(url), revision)


@dataclass(frozen=True)
class DatabaseStatus:
    url: str
    current: str | None
    head: str

    @property
    def at_head(self) -> bool:
        return self.current == self.head


def status(url: str) -> DatabaseStatus:
    """Connect and report the revision; raises ``sqlalchemy.exc.OperationalError`` if "
    "unreachable."""
    engine = make_engine(url)
    try:
        return DatabaseStatus(url=url, current=current_revision(engine), head=head_revision())
    finally:
        engine.dispose()


class DatabaseNotReady(RuntimeError):
    """The database is missing or behind the code's migrations."""


def require_head(engine: Engine) -> None:
    """Refuse to run services against a database that is not at head."""
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        raise DatabaseNotReady(
            f"database is at revision {current or 'none (empty)'}, code needs {head}: "
            "run `ctdx db upgrade`"
        )
