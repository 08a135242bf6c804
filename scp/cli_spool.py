"""``ctdx spool prune``: delete the source instances of finished studies (see scp/retention.py)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import typer

from ctdx.db import operations
from ctdx.db.cli.common import DatabaseUrlOption, UserError, open_database
from ctdx.db.cli.output import iso_utc, make_console, write_json
from ctdx.db.session import session_scope
from ctdx.db.settings import load_settings
from ctdx.scp import retention
from ctdx.scp.retention import PruneResult

spool_app = typer.Typer(
    help="The spool of received instances under CTDX_DATA_DIR.",
    no_args_is_help=True,
)

ACTION_PRUNE = "spool.prune"

PRUNE_HELP = "\n\n".join((
    'Delete the source instances of finished studies from the spool, and say how much space '
    'that freed.',
    'A study is finished when every version of it is analysed or failed, no analysis of it is '
    'running and each of its report objects is delivered or dead. Its instances go once its '
    'newest one arrived more than --older-than days ago (default CTDX_RETENTION_DAYS). Then, '
    'while the free space is below CTDX_EMERGENCY_FREE_BYTES, finished studies go regardless '
    'of age, oldest first. A study not yet analysed, or whose report is not yet delivered, is '
    "never touched. Results, audit rows and ctdx's report objects stay; `ctdx results show` "
    "says when a study's images were pruned and `ctdx studies requeue` refuses it.",
    '`ctdx worker` does this every CTDX_PRUNE_INTERVAL_SECONDS; this command does it now. '
    'Several processes and hosts may prune at once: each study is claimed in the database '
    'first. The run is recorded in the audit log (a dry run is not).',
))


class PruneFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


FormatOption = typer.Option(
    PruneFormat.TABLE, "--format", "-f", help="table (for people) or json (for scripts)."
)


def prune_json(result: PruneResult) -> dict[str, Any]:
    """The documented JSON object (docs/cli-json.md, `ctdx spool prune`)."""
    return {
        "dry_run": result.dry_run,
        "older_than_days": result.older_than_days,
        "cutoff": iso_utc(result.cutoff),
        "studies_pruned": len(result.studies),
        "files_removed": result.files_removed,
        "bytes_freed": result.bytes_freed,
        "free_bytes_before": result.free_bytes_before,
        "free_bytes_after": result.free_bytes_after,
        "emergency_free_bytes": result.emergency_free_bytes,
        "studies": [
            {
                "study_instance_uid": s.study_instance_uid,
                "versions": list(s.versions),
                "reason": s.reason,
                "last_received_at": iso_utc(s.last_received_at),
                "files_removed": s.files_removed,
                "bytes_freed": s.bytes_freed,
            }
            for s in result.studies
        ],
        "reports_removed": result.reports_removed,
        "report_bytes_freed": result.report_bytes_freed,
    }


def _megabytes(value: int) -> str:
    return f"{value / 1e6:,.1f} MB"


@spool_app.command("prune", help=PRUNE_HELP,
                   short_help="Delete source instances of finished studies past retention.")
def spool_prune(
    older_than: float | None = typer.Option(
        None, "--older-than", min=0, metavar="DAYS",
        help="Prune finished studies whose newest instance is older than this many days "
        "(default: CTDX_RETENTION_DAYS).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Only say what retention would remove; delete nothing."
    ),
    output: PruneFormat = FormatOption,
    database_url: str | None = DatabaseUrlOption,
) -> None:
    settings = load_settings(database_url=database_url)
    if not settings.spool_dir.is_dir():
        raise UserError(f"no spool at {settings.spool_dir} (CTDX_DATA_DIR)")
    with open_database(database_url) as engine:
        result = retention.prune(engine, settings, older_than_days=older_than, dry_run=dry_run)
        if not dry_run and (result.studies or result.reports_removed):
            with session_scope(engine) as session:
                operations.record(
                    session, actor=operations.default_actor(), action=ACTION_PRUNE,
                    target="spool",
                    detail={"studies": len(result.studies), "files": result.files_removed,
                            "bytes": result.bytes_freed, "older_than_days": result.older_than_days,
                            "reports": result.reports_removed},
                )
    if output is PruneFormat.JSON:
        write_json(prune_json(result))
        return
    console = make_console()
    verb = "would remove" if dry_run else "removed"
    for s in result.studies:
        console.print(f"{s.study_instance_uid}  versions {','.join(map(str, s.versions))}  "
                      f"{s.reason}  {s.files_removed} files  {_megabytes(s.bytes_freed)}",
                      highlight=False)
    console.print(
        f"{verb} {result.files_removed} files of {len(result.studies)} studies, "
        f"{_megabytes(result.bytes_freed)}; free space {_megabytes(result.free_bytes_before)} -> "
        f"{_megabytes(result.free_bytes_after)} (retention {result.older_than_days:g} days)",
        highlight=False,
    )
    if result.reports_removed:
        console.print(f"removed {result.reports_removed} delivered report objects, "
                      f"{_megabytes(result.report_bytes_freed)} (CTDX_REPORT_RETENTION_DAYS)",
                      highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(spool_app, name="spool")
