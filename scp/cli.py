"""`ctdx scp`: run the DICOM listener.

Flags override the ``CTDX_*`` settings of the same name. The command refuses
to start on a database that is missing or not at the code's migration, and
turns configuration problems into a one-line message (exit 2) rather than a
traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from ctdx.db.cli.common import (
    EXIT_DATABASE,
    EXIT_USAGE,
    UserError,
    database_unreachable,
    require_existing_sqlite,
)

logger = logging.getLogger(__name__)


def scp(
    port: Annotated[
        int | None, typer.Option("--port", help="TCP port (CTDX_PORT, default 11112).")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address (CTDX_HOST).")] = None,
    ae_title: Annotated[
        str | None, typer.Option("--ae-title", help="Our AE title (CTDX_AE_TITLE).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Spool and default database folder (CTDX_DATA_DIR)."),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="SQLAlchemy URL (CTDX_DATABASE_URL).",
                     show_default=False),
    ] = None,
    broker_url: Annotated[
        str | None,
        typer.Option("--broker-url", help="Celery broker (CTDX_BROKER_URL).", show_default=False),
    ] = None,
    quiet_seconds: Annotated[
        float | None,
        typer.Option("--quiet-seconds",
                     help="Quiet period that completes a study (CTDX_QUIET_SECONDS)."),
    ] = None,
    allowed_calling_aes: Annotated[
        str | None,
        typer.Option(
            "--allowed-calling-aes",
            help="Comma-separated calling AE titles allowed; `*` = any "
            "(CTDX_ALLOWED_CALLING_AES).",
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option("--processes",
                     help="Listener processes sharing the port (CTDX_LISTENER_PROCESSES)."),
    ] = None,
    max_associations: Annotated[
        int | None,
        typer.Option("--max-associations", help="Per process (CTDX_MAX_ASSOCIATIONS)."),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM certificate (CTDX_TLS_CERT).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="PEM key (CTDX_TLS_KEY).")
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option("--tls-ca", help="CA bundle; requires client certificates (CTDX_TLS_CA)."),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR. "
                          "DEBUG also shows Alembic's INFO lines, quiet otherwise.")
    ] = "INFO",
) -> None:
    """Receive CT studies (C-STORE, MPPS), store them durably, queue complete ones."""
    from ctdx.db.logs import configure_logging
    from ctdx.db.migrate import DatabaseNotReady, require_head
    from ctdx.db.session import make_engine
    from ctdx.db.settings import load_settings
    from ctdx.scp.server import serve, tls_context

    try:
        settings = load_settings(
            port=port,
            host=host,
            ae_title=ae_title,
            data_dir=data_dir,
            database_url=database_url,
            broker_url=broker_url,
            quiet_seconds=quiet_seconds,
            allowed_calling_aes=allowed_calling_aes,
            listener_processes=processes,
            max_associations=max_associations,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
        )
        tls_context(settings)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise UserError(f"invalid setting: {problems}", EXIT_USAGE) from None
    except (ValueError, OSError) as exc:
        raise UserError(f"TLS configuration: {exc}", EXIT_USAGE) from None

    configure_logging(level=log_level.upper())
    url = settings.resolved_database_url
    require_existing_sqlite(url)
    engine = make_engine(url)
    try:
        require_head(engine)
    except DatabaseNotReady as exc:
        raise UserError(str(exc), EXIT_DATABASE) from None
    except OperationalError as exc:
        raise database_unreachable(exc) from None
    finally:
        engine.dispose()
    try:
        serve(settings)
    except OSError as exc:
        raise UserError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
                        EXIT_USAGE) from None
    except OperationalError as exc:
        raise database_unreachable(exc) from None


def register(app: typer.Typer) -> None:
    """Add ``ctdx scp`` to the root app."""
    app.command("scp")(scp)
