"""`ctdx validate`: check the study call on the site's own studies and adopt an operating point.

Thin commands over :mod:`ctdx.db.validation_db` (database), :mod:`ctdx.db.validation_report`
(truth file, document, files) and :mod:`ctdx.db.validation` (the numbers).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import typer
from rich.text import Text

from ctdx.db import operations
from ctdx.db.cli.common import EXIT_REFUSED, EXIT_USAGE, DatabaseUrlOption, UserError, open_database
from ctdx.db.cli.output import (
    Column,
    ListFormat,
    fitted_table,
    make_console,
    percent,
    write_csv,
    write_json,
)
from ctdx.db.session import session_scope
from ctdx.db.validation_db import (
    Drift,
    PeriodUnit,
    ValidationError,
    adopt,
    current_operating_point,
    load_cases,
    model_in_use,
)
from ctdx.db.validation_db import drift as period_drift

logger = logging.getLogger(__name__)


class RunFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


class Choice(StrEnum):
    TARGET = "target"
    PAPER = "paper"


validate_app = typer.Typer(
    help="Local validation: how the study call performs on this site's studies, and the "
    "site's operating point (the threshold the worker uses).",
    no_args_is_help=True,
)

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 2 bad option or truth file, 3 database missing/unreachable/not "
    "upgraded, 5 refused (nothing usable to validate or adopt)."
)

VALIDATE_RUN_HELP = (
    "Compare ctdx's study calls with the truth for studies it has already analysed.\n\n"
    "TRUTH.csv has a header with a study_instance_uid or accession_number column and a "
    "truth column (covid19, other_pneumonia or normal); other columns are ignored. The "
    "studies are joined with the results of one model: by default the model of the newest "
    "analysis in the database, or the one --model names (model UID or version). Studies "
    "that are missing, failed, not yet analysed or analysed only by another model are "
    "listed and left out.\n\n"
    "Writes into --out: report.md, validation.json (the --format json document), "
    "cases.csv, excluded.csv, confusion_3x3.csv, table_2x2.csv, metrics.csv, roc.csv and "
    "roc.png: the 3x3 confusion matrix, sensitivity, specificity and accuracy with Wilson "
    "95% intervals, the ROC and AUC of the COVID-19 slice share (bootstrap 95% interval), "
    "and the threshold that reaches --target-sensitivity next to the paper's 5%.\n\n"
    "Example:\n"
    "ctdx validate run --truth truth.csv --out validation/2026-12"
)
VALIDATE_ADOPT_HELP = (
    "Record the operating point of a validation (the folder `ctdx validate run` wrote) "
    "as this site's: the worker then calls studies of that model at its threshold, and "
    "each SR states it with the validation it rests on. --choice target (default) adopts "
    "the threshold that reached the target sensitivity, --choice paper the paper's 5%. "
    "CTDX_COVID_THRESHOLD, when set, still overrides it (the worker logs that).\n\n"
    "Recorded in the audit log with your user@host.\n\n"
    "Example:\n"
    "ctdx validate adopt validation/2026-12"
)


TruthOption = typer.Option(..., "--truth", metavar="TRUTH.csv", dir_okay=False,
                           help="Studies and their true class (see above).")
OutOption = typer.Option(..., "--out", metavar="DIR", file_okay=False,
                         help="Folder for the report and tables (created; files replaced).")
TargetOption = typer.Option(0.95, "--target-sensitivity", min=0.01, max=1.0,
                            help="Find the threshold that reaches this sensitivity.")
ModelOption = typer.Option(
    None, "--model", metavar="UID_OR_VERSION",
    help="Validate this model (default: the model of the newest analysis).")
RunFormatOption = typer.Option(
    RunFormat.TABLE, "--format", "-f", case_sensitive=False,
    help="table: a summary for people; json: the document (docs/cli-json.md) on stdout.")
DirArgument = typer.Argument(..., metavar="DIR", file_okay=False,
                             help="The --out folder of `ctdx validate run`.")
ChoiceOption = typer.Option(
    Choice.TARGET, "--choice", case_sensitive=False,
    help="target: the threshold that reached the target sensitivity; paper: 5%.")


@validate_app.command("run", help=VALIDATE_RUN_HELP, epilog=EXIT_CODES_HELP,
                      short_help="Validate the study call against a truth file.")
def validate_run(
    truth: Path = TruthOption,
    out: Path = OutOption,
    target_sensitivity: float = TargetOption,
    model: str | None = ModelOption,
    output: RunFormat = RunFormatOption,
    database_url: str | None = DatabaseUrlOption,
) -> None:
    """`ctdx validate run`."""
    from ctdx.db.validation_report import evaluate, read_truth, write_outputs  # numpy, scikit-learn

    try:
        rows, digest = read_truth(truth)
    except ValidationError as exc:
        raise UserError(str(exc), EXIT_USAGE) from None
    with open_database(database_url) as engine, session_scope(engine) as session:
        try:
            ref = model_in_use(session, model)
        except ValidationError as exc:
            raise UserError(str(exc), EXIT_REFUSED) from None
        cases, excluded = load_cases(session, rows, ref)
    try:
        doc = evaluate(cases, excluded, ref, truth_path=truth.absolute(), truth_sha256=digest,
                       truth_rows=len(rows), target_sensitivity=target_sensitivity,
                       validated_at=datetime.now(UTC))
    except ValidationError as exc:
        raise UserError(str(exc), EXIT_REFUSED) from None
    files = write_outputs(out, doc, cases)
    logger.info("validation of %s: %d studies, %d excluded, written to %s", ref.model_uid,
                len(cases), len(excluded), out)
    if output is RunFormat.JSON:
        write_json({**doc, "files": files})
        return
    _summary(doc, out)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _prop(p: dict[str, object] | None) -> str:
    if not p or p.get("value") is None:
        return "-"
    return f"{_pct(p['value'])} ({_pct(p['low'])}–{_pct(p['high'])})"  # type: ignore[arg-type]


def _summary(doc: dict[str, object], out: Path) -> None:
    console = make_console()
    rep = doc["as_reported"]
    target = doc["at_target_sensitivity"]
    paper = doc["at_paper_threshold"]
    roc = doc["roc"]
    model = doc["model"]
    assert isinstance(rep, dict) and isinstance(target, dict) and isinstance(paper, dict)
    assert isinstance(roc, dict) and isinstance(model, dict)
    lines = [
        f"{model['model_name']} {model['model_version']} (UID {model['model_uid']})",
        f"{doc['n_studies']} studies ({doc['n_positive']} COVID-19, {doc['n_negative']} not); "
        f"{doc['n_excluded']} left out (see excluded.csv)",
        f"as reported (threshold {_pct(doc['current_threshold'])}): sensitivity "  # type: ignore[arg-type]
        f"{_prop(rep['sensitivity'])}, specificity {_prop(rep['specificity'])}, "
        f"3-class accuracy {_prop(rep['accuracy_3class'])}",
        "AUC " + ("-" if roc["auc"] is None else
                  f"{roc['auc']:.3f} ({roc['auc_low']:.3f}–{roc['auc_high']:.3f})"),
        (f"sensitivity {doc['target_sensitivity']} not reachable" if target["threshold"] is None
         else f"threshold {_pct(target['threshold'])} reaches sensitivity "
              f"{_prop(target['sensitivity'])} at specificity {_prop(target['specificity'])}"),
        f"paper's 5%: sensitivity {_prop(paper['sensitivity'])}, specificity "
        f"{_prop(paper['specificity'])}",
        f"report: {out / 'report.md'}",
    ]
    for line in lines:
        console.print(Text(line))


@validate_app.command("adopt", help=VALIDATE_ADOPT_HELP, epilog=EXIT_CODES_HELP,
                      short_help="Make a validation's threshold the site's operating point.")
def validate_adopt(
    directory: Path = DirArgument,
    choice: Choice = ChoiceOption,
    database_url: str | None = DatabaseUrlOption,
) -> None:
    """`ctdx validate adopt`."""
    from ctdx.db.validation_report import read_validation

    try:
        doc = read_validation(directory)
    except ValidationError as exc:
        raise UserError(str(exc), EXIT_USAGE) from None
    actor = operations.default_actor()
    with open_database(database_url) as engine, session_scope(engine) as session:
        before = current_operating_point(session, doc["model"]["model_uid"])
        try:
            point = adopt(session, doc, choice=choice.value, actor=actor,
                          source_dir=str(directory.absolute()))
        except ValidationError as exc:
            raise UserError(f"refused: {exc}", EXIT_REFUSED) from None
    was = "" if before is None else f" (was {_pct(before.threshold)})"
    make_console().print(Text(
        f"operating point {point.id} adopted for {point.model_name} {point.model_version}: "
        f"COVID-19 when more than {_pct(point.threshold)} of analysed slices are{was}; "
        f"sensitivity {_pct(point.sensitivity)} ({_pct(point.sensitivity_low)}–"
        f"{_pct(point.sensitivity_high)}), specificity {_pct(point.specificity)} "
        f"({_pct(point.specificity_low)}–{_pct(point.specificity_high)}) on "
        f"{point.n_studies} studies; recorded by {actor}"
    ))


def register(app: typer.Typer) -> None:
    """Add the `validate` noun to the root `ctdx` app."""
    app.add_typer(validate_app, name="validate")


# --- `ctdx results stats --by week|month` -------------------------------------------------

ByOption = typer.Option(
    None, "--by", case_sensitive=False,
    help="Per local week or month instead: studies, share called COVID-19, mean COVID-19 "
    "slice share, and DRIFT where the share called COVID-19 differs from the adopted "
    "validation's beyond chance (binomial test, p < 0.01; docs/validation.md).",
)

PERIOD_FIELDS = (
    "period", "start", "end", "studies", "called_covid19", "positive_rate",
    "mean_fraction_covid19", "above_baseline_threshold", "p_value", "flagged",
)


def _baseline_json(drift: Drift) -> dict[str, object] | None:
    b = drift.baseline
    if b is None:
        return None
    return {
        "operating_point_id": b.id, "model_name": b.model_name, "model_version": b.model_version,
        "model_uid": b.model_uid, "threshold": b.threshold, "positive_rate": b.positive_rate,
        "n_studies": b.n_studies, "validated_at": b.validated_at, "adopted_at": b.adopted_at,
    }


def drift_json(drift: Drift) -> dict[str, object]:
    """The documented object of ``ctdx results stats --by`` (docs/cli-json.md)."""
    return {
        "by": str(drift.by),
        "since": drift.since,
        "until": drift.until,
        "baseline": _baseline_json(drift),
        "alpha": drift.alpha,
        "periods": [{name: getattr(p, name) for name in PERIOD_FIELDS} for p in drift.periods],
    }


def stats_by_period(by: PeriodUnit, since: datetime | None, until: datetime | None,
                    output: ListFormat, database_url: str | None) -> None:
    """`ctdx results stats --by`: the drift view of :func:`ctdx.db.validation_db.drift`."""
    with open_database(database_url) as engine, session_scope(engine) as session:
        drift = period_drift(session, by, since=since, until=until)
    if output is ListFormat.JSON:
        write_json(drift_json(drift))
        return
    rows = [{name: getattr(p, name) for name in PERIOD_FIELDS} for p in drift.periods]
    if output is ListFormat.CSV:
        write_csv(PERIOD_FIELDS, rows)
        return
    console = make_console()
    b = drift.baseline
    console.print(Text(
        "no operating point adopted: no baseline to compare with (`ctdx validate adopt`)"
        if b is None else
        f"baseline: {_pct(b.positive_rate)} called COVID-19 in the validation of "
        f"{b.model_name} {b.model_version} ({b.n_studies} studies, threshold "
        f"{_pct(b.threshold)}); DRIFT = the share above {_pct(b.threshold)} differs, "
        f"binomial test p < {drift.alpha:g}"))
    if not drift.periods:
        console.print(Text("No analysed studies in the period."))
        return
    columns = [
        Column("Period", lambda p: p.period, min_width=7, max_width=8),
        Column("Studies", lambda p: str(p.studies), min_width=7, max_width=8, justify="right"),
        Column("COVID-19", lambda p: f"{p.called_covid19} ({percent(p.positive_rate)})",
               min_width=8, max_width=14, justify="right"),
        Column("Mean share", lambda p: percent(p.mean_fraction_covid19), min_width=6,
               max_width=10, justify="right"),
        Column(">thr", lambda p: "-" if p.above_baseline_threshold is None
               else str(p.above_baseline_threshold), min_width=4, max_width=6, justify="right",
               drop=2),
        Column("p", lambda p: "-" if p.p_value is None else f"{p.p_value:.2g}", min_width=5,
               max_width=8, justify="right", drop=1),
        Column("Flag", lambda p: "DRIFT" if p.flagged else "", min_width=5, max_width=5),
    ]
    console.print(fitted_table(console, columns, drift.periods))
