"""`ctdx results`, `ctdx studies`, `ctdx exports`: query and operate the results database.

Thin commands: they parse options, open the database (refusing a missing or
outdated one), call :mod:`ctdx.db.queries` / :mod:`ctdx.db.operations` in one session,
and hand the frozen results to :mod:`ctdx.db.cli.views`. Domain exceptions become
one-line messages with the exit codes of :mod:`ctdx.db.cli.common`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum

import typer
from rich.text import Text

from ctdx.db import health, operations, queries
from ctdx.db.cli import views as views
from ctdx.db.cli.common import (
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_USAGE,
    DatabaseUrlOption,
    UserError,
    open_database,
)
from ctdx.db.cli.dates import BadDate, parse_period
from ctdx.db.cli.output import ListFormat, make_console, write_csv, write_json
from ctdx.db.cli.validate import ByOption, stats_by_period
from ctdx.db.models import STUDY_DECISIONS, ExportState, VersionState, utcnow
from ctdx.db.session import session_scope
from ctdx.db.validation_db import PeriodUnit

logger = logging.getLogger(__name__)


class DocFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


results_app = typer.Typer(
    help="What came in and what was found: list studies, show one, summarise a period.",
    no_args_is_help=True,
)
studies_app = typer.Typer(
    help="Operator actions on studies (recorded in the audit log).", no_args_is_help=True
)
exports_app = typer.Typer(
    help="Reports sent to PACS: see which failed to arrive and send them again.",
    no_args_is_help=True,
)

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 2 bad option or date, 3 database missing/unreachable/not upgraded, "
    "4 unknown study or export, 5 action refused."
)

SinceOption = typer.Option(
    None, "--since", metavar="WHEN",
    help="From this time on: 2026-05-01, 2026-05-01T08:00, 24h, 7d, today, yesterday "
    "(local time unless it ends in Z or ±HH:MM).",
    show_default=False,
)
UntilOption = typer.Option(
    None, "--until", metavar="WHEN",
    help="Before this time (a whole day, e.g. 2026-05-01 or today, is included).",
    show_default=False,
)
LimitOption = typer.Option(100, "--limit", min=1, help="Show at most this many rows, newest first.")
ListFormatOption = typer.Option(
    ListFormat.TABLE, "--format", "-f", case_sensitive=False,
    help="table for people; json or csv for scripts (fields: docs/cli-json.md).",
)
DocFormatOption = typer.Option(
    DocFormat.TABLE, "--format", "-f", case_sensitive=False,
    help="table for people; json for scripts (fields: docs/cli-json.md).",
)
ShowPhiOption = typer.Option(
    False, "--show-phi",
    help="Also print patient name and patient ID (PHI). Without it, output identifies "
    "studies by UID and accession number only.",
)
StudyArgument = typer.Argument(
    ..., metavar="STUDY", help="Study Instance UID, or an accession number that names one study.",
    show_default=False,
)

StatusOption = typer.Option(
    None, "--status", case_sensitive=False, metavar="STATE",
    help="Only studies in this state: receiving, complete (waiting for the queue), "
    "queued, processing, analysed or failed.",
)


def _decision(value: str | None) -> str | None:
    """The study calls of the method (``ctdx.db.models.STUDY_DECISIONS``); a typo is an error."""
    if value is None:
        return None
    call = value.strip().lower()
    if call not in STUDY_DECISIONS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(STUDY_DECISIONS)}")
    return call


DecisionOption = typer.Option(
    None, "--decision", metavar="CALL", callback=_decision,
    help=f"Only this study call: {', '.join(STUDY_DECISIONS)}.",
)
CallingAeOption = typer.Option(
    None, "--calling-ae", metavar="AE", help="Only studies sent by this calling AE title."
)
KeySlicesOption = typer.Option(
    queries.KEY_SLICES, "--key-slices", min=0,
    help="How many of the most COVID-like slices to list per analysis.",
)
ForceOption = typer.Option(
    False, "--force",
    help="Also requeue a study that is waiting, queued or being analysed (only when "
    "its task was lost, e.g. the broker's data was wiped).",
)
ExportStateOption = typer.Option(
    None, "--state", case_sensitive=False, metavar="STATE",
    help="Only exports in this state: pending (will be tried again), delivered, or "
    "dead (gave up: retry with `ctdx exports retry`).",
)
ExportStudyOption = typer.Option(
    None, "--study", metavar="STUDY", help="Only this study's exports (UID or accession)."
)
ExportIdArgument = typer.Argument(
    None, metavar="ID", help="Export id (first column of `ctdx exports list`).",
    show_default=False,
)
DeadOption = typer.Option(False, "--dead", help="Retry every dead export.")


# Help texts: paragraphs separated by blank lines; single newlines are kept (examples).
RESULTS_LIST_HELP = (
    "List studies, newest first: when each arrived, its state, the study call "
    "(covid19, other_pneumonia, normal), the share of COVID-19 slices, and whether its "
    "report reached PACS.\n\n"
    "Each study is shown by its newest version (instances arriving after a study was "
    "complete open a new version); --since/--until select by the time that version "
    "started arriving. Table times are local; json and csv are UTC. Narrow terminals "
    "shorten UIDs, keeping a part that tells the listed studies apart: use the accession "
    "number, or --format csv, to get them whole.\n\n"
    "Examples:\n"
    "ctdx results list --since today                    (what came in today)\n"
    "ctdx results list --since 7d --decision covid19    (COVID-19 this week)\n"
    "ctdx results list --status failed --format csv > failed.csv"
)
RESULTS_SHOW_HELP = (
    "Show one study: its versions, the series analysed and why, per-class fractions, "
    "threshold and decision, manifestations, timings, key slices (most COVID-like), the "
    "report's SOP Instance UID with its delivery attempts, and operator actions.\n\n"
    "Examples:\n"
    "ctdx results show 1.2.840.113619.2.55.3.1234\n"
    "ctdx results show ACC12345 --format json"
)
RESULTS_STATS_HELP = (
    "Summarise a period (default: all time): study versions per status and per decision, "
    "report delivery states, median and 95th-percentile time from study completion to "
    "SR delivered, and failures by reason.\n\n"
    "Example:\n"
    "ctdx results stats --since 7d"
)
STUDIES_REQUEUE_HELP = (
    "Analyse a study's newest version again, e.g. after its failure was fixed or a new "
    "model was installed. The version goes back to the outbox and the listener hands it "
    "to the queue within seconds. Failed analyses of the version are removed so that "
    "they are tried again (their reasons stay in the audit log); analysed results are "
    "kept, and are redone only by a worker running another model.\n\n"
    "Refused (exit 5) while the study is still arriving or its analysis is not finished. "
    "Recorded in the audit log with your user@host.\n\n"
    "Example:\n"
    "ctdx studies requeue ACC12345"
)
EXPORTS_LIST_HELP = (
    "List report objects (SR, and SC/KO where configured) sent or to be sent to PACS, "
    "newest first, with attempts and the last error. --since/--until select by the time "
    "the export was created.\n\n"
    "Example:\n"
    "ctdx exports list --state dead      (reports that did not reach PACS)"
)
EXPORTS_RETRY_HELP = (
    "Send a report to PACS again: one export by ID, or every dead one with --dead. The "
    "export becomes pending and due now, with a fresh retry schedule; the report sender "
    "delivers it at its next pass.\n\n"
    "Refused (exit 5) for an export already delivered. Each retry is recorded in the "
    "audit log with your user@host, the previous attempts and the last error.\n\n"
    "Examples:\n"
    "ctdx exports retry 17\n"
    "ctdx exports retry --dead"
)


def _period(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    try:
        return parse_period(since, until)
    except BadDate as exc:
        raise UserError(str(exc), EXIT_USAGE) from None


@contextmanager
def _domain_errors() -> Iterator[None]:
    """Domain exceptions -> one-line user errors with their documented exit codes."""
    try:
        yield
    except (queries.StudyNotFound, operations.ExportNotFound) as exc:
        raise UserError(str(exc), EXIT_NOT_FOUND) from None
    except queries.AmbiguousStudy as exc:
        raise UserError(str(exc), EXIT_USAGE) from None
    except operations.ActionRefused as exc:
        raise UserError(f"refused: {exc}", EXIT_REFUSED) from None


# --- results --------------------------------------------------------------------------


@results_app.command(
    "list",
    help=RESULTS_LIST_HELP,
    short_help='List studies, newest first, with their state, call and report delivery.',
    epilog=EXIT_CODES_HELP,
)
def results_list(
    since: str | None = SinceOption,
    until: str | None = UntilOption,
    status: VersionState | None = StatusOption,
    decision: str | None = DecisionOption,
    calling_ae: str | None = CallingAeOption,
    limit: int = LimitOption,
    output: ListFormat = ListFormatOption,
    show_phi: bool = ShowPhiOption,
    database_url: str | None = DatabaseUrlOption,
) -> None:
    """`ctdx results list`: one row per study (newest version)."""
    start, end = _period(since, until)
    with open_database(database_url) as engine, session_scope(engine) as session:
        rows = queries.list_studies(
            session, since=start, until=end,
            status=status.value if status else None,
            decision=decision, calling_ae_title=calling_ae, limit=limit, include_phi=show_phi,
        )
    fields = views.with_phi(views.STUDY_FIELDS, show_phi)
    if output is ListFormat.JSON:
        write_json([views.record(r, fields) for r in rows])
    elif output is ListFormat.CSV:
        write_csv(fields, [views.record(r, fields) for r in rows])
    else:
        console = make_console()
        if not rows:
            console.print(Text("No studies match."))
            return
        console.print(views.studies_table(console, rows, show_phi))
        if len(rows) == limit:
            console.print(Text(f"(first {limit}; --limit shows more)", style="dim"))


@results_app.command(
    "show",
    help=RESULTS_SHOW_HELP,
    short_help='Show everything about one study (by UID or accession number).',
    epilog=EXIT_CODES_HELP,
)
def results_show(
    study: str = StudyArgument,
    key_slices: int = KeySlicesOption,
    output: DocFormat = DocFormatOption,
    show_phi: bool = ShowPhiOption,
    database_url: str | None = DatabaseUrlOption,
) -> None:
    """`ctdx results show`: one study in full."""
    with _domain_errors(), open_database(database_url) as engine, session_scope(
        engine
    ) as session:
        detail = queries.get_study(session, study, include_phi=show_phi, key_slices=key_slices)
    if output is DocFormat.JSON:
        write_json(views.detail_json(detail, show_phi))
    else:
        console = make_console()
        console.print(views.detail_view(console, detail, show_phi))


@results_app.command(
    "stats",
    help=RESULTS_STATS_HELP,
    short_help='Counts, turnaround and failures over a period.',
    epilog=EXIT_CODES_HELP,
)
def results_stats(
    since: str | None = SinceOption,
    until: str | None = UntilOption,
    by: PeriodUnit | None = ByOption,
    output: ListFormat = ListFormatOption,
    database_url: str | None = DatabaseUrlOption,
) -> None:
    """`ctdx results stats`: a period summarised."""
    start, end = _period(since, until)
    if by is not None:  # drift per week or month (db.cli.validate)
        return stats_by_period(by, start, end, output, database_url)
    with open_database(database_url) as engine, session_scope(engine) as session:
        stats = queries.study_stats(session, since=start, until=end)
        waiting = health.waiting_now(session, utcnow())  # now, whatever the period
    if output is ListFormat.JSON:
        write_json({**views.stats_json(stats), "waiting": health.waiting_json(waiting)})
    elif output is ListFormat.CSV:
        write_csv(views.STATS_CSV_FIELDS, views.stats_csv_rows(stats) + [
            {"section": "waiting", "key": k, "value": v}
            for k, v in health.waiting_json(waiting).items()
        ])
    else:
        console = make_console()
        console.print(views.stats_view(console, stats))
        console.print(health.waiting_text(waiting))


# --- studies --------------------------------------------------------------------------


@studies_app.command(
    "requeue",
    help=STUDIES_REQUEUE_HELP,
    short_help="Analyse a study's newest version again.",
    epilog=EXIT_CODES_HELP,
)
def studies_requeue(
    study: str = StudyArgument,
    force: bool = ForceOption,
    database_url: str | None = DatabaseUrlOption,
) -> None:
    """`ctdx studies requeue`: see :func:`ctdx.db.operations.requeue_study`."""
    actor = operations.default_actor()
    with _domain_errors(), open_database(database_url) as engine, session_scope(
        engine
    ) as session:
        uid = queries.resolve_study(session, study)
        done = operations.requeue_study(session, uid, actor, force=force)
    make_console().print(Text(
        f"requeued study {done.study_instance_uid} version {done.version} "
        f"(was {done.previous_state}); audit entry {done.audit_id}"
    ))


# --- exports --------------------------------------------------------------------------


@exports_app.command(
    "list",
    help=EXPORTS_LIST_HELP,
    short_help='List reports sent (or to be sent) to PACS, with errors.',
    epilog=EXIT_CODES_HELP,
)
def exports_list(
    state: ExportState | None = ExportStateOption,
    study: str | None = ExportStudyOption,
    since: str | None = SinceOption,
    until: str | None = UntilOption,
    limit: int = LimitOption,
    output: ListFormat = ListFormatOption,
    database_url: str | None = DatabaseUrlOption,
) -> None:
    """`ctdx exports list`: the export outbox, newest first."""
    start, end = _period(since, until)
    with _domain_errors(), open_database(database_url) as engine, session_scope(
        engine
    ) as session:
        uid = queries.resolve_study(session, study) if study else None
        rows = queries.list_exports(
            session, state=state.value if state else None, since=start, until=end,
            study_instance_uid=uid, limit=limit,
        )
    if output is ListFormat.JSON:
        write_json([views.export_record(r) for r in rows])
    elif output is ListFormat.CSV:
        write_csv(views.EXPORT_FIELDS, [views.export_record(r) for r in rows])
    else:
        console = make_console()
        if not rows:
            console.print(Text("No exports match."))
            return
        console.print(views.exports_table(console, rows))


@exports_app.command(
    "retry",
    help=EXPORTS_RETRY_HELP,
    short_help='Send a report to PACS again: one by ID, or all dead ones.',
    epilog=EXIT_CODES_HELP,
)
def exports_retry(
    export_id: int | None = ExportIdArgument,
    dead: bool = DeadOption,
    database_url: str | None = DatabaseUrlOption,
) -> None:
    """`ctdx exports retry`: see :func:`ctdx.db.operations.retry_export`."""
    if (export_id is None) == (not dead):
        raise UserError("give an export ID or --dead (not both)", EXIT_USAGE)
    actor = operations.default_actor()
    with _domain_errors(), open_database(database_url) as engine, session_scope(
        engine
    ) as session:
        done = operations.retry_export(session, export_id, dead=dead, actor=actor)
    console = make_console()
    if not done:
        console.print(Text("no dead exports; nothing to retry"))
        return
    for r in done:
        console.print(Text(
            f"export {r.export_id} to {r.destination} is pending again "
            f"(was {r.previous_state} after {r.previous_attempts} attempts)"
        ))


def register(app: typer.Typer) -> None:
    """Add the results/studies/exports nouns to the root `ctdx` app."""
    app.add_typer(results_app, name="results")
    app.add_typer(studies_app, name="studies")
    app.add_typer(exports_app, name="exports")
