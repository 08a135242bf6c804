"""``ctdx worker``: a standard Celery worker for the ``ctdx`` queue, plus export delivery.

Equivalent to ``celery -A worker.celery_app worker -Q ctdx`` (which works too),
with checks first so a misconfigured worker stops with one clear line instead
of failing every study: the database must be at the migrations' head and the
recognition checkpoint must load. The main process also runs the report
export delivery loop (``ctdx.worker.report.delivery.DeliveryLoop``) in a daemon
thread, so PACS deliveries are retried while workers run.
"""

from __future__ import annotations

import logging
import threading

import typer

from ctdx.db.cli.common import EXIT_USAGE, UserError, open_database
from ctdx.db.session import make_engine
from ctdx.db.settings import Settings, load_settings
from ctdx.worker import housekeeping

logger = logging.getLogger(__name__)

POOLS = ("prefork", "solo", "threads")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root `ctdx` app."""
    app.command("worker")(worker_command)


def check_ready(settings: Settings) -> None:
    """The database is at head and the recognition model loads; else a clean user error."""
    with open_database(settings.database_url):
        pass  # exists, reachable, at head (else a UserError with exit code 3)
    if settings.model is None:
        raise UserError(
            "no recognition model: set CTDX_MODEL to a checkpoint (ctdx train export)", EXIT_USAGE
        )
    from ctdx.model_train.method.checkpoint import CheckpointError, load_checkpoint

    for path, task in ((settings.model, "recognition"),
                       (settings.manifestation_model, "manifestation")):
        if path is None:
            continue
        try:  # on the meta device: checks everything, computes nothing, forks safely
            load_checkpoint(path, task=task, device="meta")  # type: ignore[arg-type]
        except CheckpointError as exc:
            raise UserError(f"{task} model: {exc}", EXIT_USAGE) from None


def start_export_delivery(settings: Settings) -> threading.Event:
    """Run the export delivery loop in a daemon thread of this (main) process."""
    from ctdx.worker.report.delivery import DeliveryLoop

    stop = threading.Event()
    loop = DeliveryLoop(make_engine(settings.resolved_database_url), settings)
    threading.Thread(target=loop.run, args=(stop,), name="ctdx-export-delivery",
                     daemon=True).start()
    return stop


def worker_command(
    concurrency: int = typer.Option(
        1, "--concurrency", "-c", min=1, metavar="N",
        help="Analyses at a time on this machine (processes); one per GPU, or cores/2 on CPU.",
    ),
    pool: str = typer.Option(
        "prefork", "--pool", "-P", metavar="POOL", help=f"Celery pool: {', '.join(POOLS)}.",
    ),
    loglevel: str = typer.Option(
        "INFO", "--loglevel", "-l", metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR. DEBUG also shows the INFO lines of Alembic and "
        "highdicom (one SR: seven lines), quiet otherwise.",
    ),
    hostname: str | None = typer.Option(
        None, "--hostname", "-n", metavar="NAME", help="Celery node name (default celery@<host>)."
    ),
    queues: str = typer.Option(
        "ctdx", "--queues", "-Q", metavar="QUEUES", help="Comma-separated queues to consume."
    ),
    export_delivery: bool = typer.Option(
        True, "--export-delivery/--no-export-delivery",
        help="Also deliver pending report exports to PACS from this process.",
    ),
) -> None:
    """Analyse studies from the queue (a Celery worker); Ctrl-C finishes the running study."""
    from ctdx.db.logs import configure_logging

    if pool not in POOLS:
        raise UserError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}", EXIT_USAGE)
    configure_logging(loglevel.upper())
    settings = load_settings()
    check_ready(settings)
    stop = start_export_delivery(settings) if export_delivery else None
    housekeeping.start(settings)  # spool pruning and alert delivery (daemon threads)

    from ctdx.worker.celery_app import app as celery_app

    # workers coordinate through the database, not by broadcast: no gossip, no mingle
    argv = ["worker", "-Q", queues, "--concurrency", str(concurrency), "--pool", pool,
            "--loglevel", loglevel.upper(), "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["--hostname", hostname]
    try:
        celery_app.worker_main(argv=argv)
    finally:
        if stop is not None:
            stop.set()
