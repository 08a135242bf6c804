"""How each query result looks: the documented JSON/CSV fields and the Rich layouts.

Field lists here are the contract of ``docs/cli-json.md``; a test compares
them with the document. Patient name and ID appear only when ``show_phi`` is
set (and the queries only read them then).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from ctdx.db.cli.output import (
    Column,
    fitted_table,
    iso_utc,
    local_time,
    percent,
    seconds,
    short_time,
)
from ctdx.db.queries import (
    AnalysisInfo,
    AuditInfo,
    ExportInfo,
    ExportRow,
    Stats,
    StudyDetail,
    StudyRow,
    VersionInfo,
)

PHI_FIELDS = ("patient_id", "patient_name")

STUDY_FIELDS = (
    "study_instance_uid",
    "accession_number",
    "study_date",
    "version",
    "status",
    "calling_ae_title",
    "received_at",
    "last_received_at",
    "completed_at",
    "instance_count",
    "analysis_state",
    "decision",
    "fraction_covid19",
    "model_name",
    "model_version",
    "report_state",
)

EXPORT_FIELDS = (
    "id",
    "study_instance_uid",
    "accession_number",
    "version",
    "kind",
    "destination",
    "sop_instance_uid",
    "replaces_sop_instance_uid",
    "state",
    "attempts",
    "last_status",
    "last_error",
    "created_at",
    "last_attempt_at",
    "next_attempt_at",
    "delivered_at",
)

STATS_CSV_FIELDS = ("section", "key", "value")


def with_phi(fields: Sequence[str], show_phi: bool) -> tuple[str, ...]:
    """Insert the PHI fields after ``accession_number`` when asked for."""
    if not show_phi:
        return tuple(fields)
    at = list(fields).index("accession_number") + 1
    return (*fields[:at], *PHI_FIELDS, *fields[at:])


def record(obj: Any, fields: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in fields}


def export_record(row: Any, fields: Sequence[str] = EXPORT_FIELDS) -> dict[str, Any]:
    """An export's fields; ``next_attempt_at`` only while one is due (state pending): the
    column keeps its last value after delivery or dead-lettering, which is no plan."""
    out = record(row, fields)
    if "next_attempt_at" in out and row.state != "pending":
        out["next_attempt_at"] = None
    return out


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


# --- results list ---------------------------------------------------------------------


def study_columns(show_phi: bool) -> list[Column]:
    columns = [
        Column("Received", lambda r: short_time(r.received_at), min_width=11, max_width=11),
        # with --show-phi on a narrow terminal, patient and accession identify the row
        Column("Study UID", lambda r: r.study_instance_uid, min_width=16, max_width=64,
               flex=True, middle=True, drop=4 if show_phi else None),
        Column("Accession", lambda r: _text(r.accession_number), min_width=8, max_width=16),
    ]
    if show_phi:
        columns += [
            Column("Patient ID", lambda r: _text(r.patient_id), min_width=8, max_width=16),
            Column("Patient name", lambda r: _text(r.patient_name), min_width=8, max_width=24),
        ]
    columns += [
        Column("Status", lambda r: r.status, min_width=8, max_width=10),
        Column("Decision", lambda r: _text(r.decision), min_width=8, max_width=15),
        Column("COVID", lambda r: percent(r.fraction_covid19), min_width=5, max_width=6,
               justify="right"),
        Column("Report", lambda r: _text(r.report_state), min_width=7, max_width=9),
        Column("Calling AE", lambda r: _text(r.calling_ae_title), min_width=6, max_width=16,
               drop=2),
        Column("Model", lambda r: _model(r.model_name, r.model_version), min_width=8,
               max_width=28, drop=1),
        Column("V", lambda r: str(r.version), min_width=1, max_width=3, justify="right",
               drop=3),
    ]
    return columns


def _model(name: str | None, version: str | None) -> str:
    if name is None:
        return "-"
    return f"{name} {version}" if version else name


def studies_table(console: Console, rows: Sequence[StudyRow], show_phi: bool) -> Table:
    return fitted_table(console, study_columns(show_phi), rows)


# --- exports list ---------------------------------------------------------------------


def export_columns() -> list[Column]:
    # At 80 columns the last error matters more than the kind, the (usually single)
    # destination and the accession number: those go first.
    return [
        Column("ID", lambda r: str(r.id), min_width=2, max_width=8, justify="right"),
        Column("Created", lambda r: short_time(r.created_at), min_width=11, max_width=11),
        Column("Study UID", lambda r: r.study_instance_uid, min_width=14, max_width=64,
               flex=True, middle=True),
        Column("Accession", lambda r: _text(r.accession_number), min_width=8, max_width=16,
               drop=3),
        Column("Kind", lambda r: r.kind, min_width=2, max_width=4, drop=1),
        Column("Destination", lambda r: r.destination, min_width=10, max_width=28, drop=2),
        Column("State", lambda r: r.state, min_width=7, max_width=9),
        Column("Tries", lambda r: str(r.attempts), min_width=5, max_width=5, justify="right"),
        Column("Last error", lambda r: _text(r.last_error), min_width=24, max_width=80,
               flex=True, grow=1),
    ]


def exports_table(console: Console, rows: Sequence[ExportRow]) -> Table:
    return fitted_table(console, export_columns(), rows)


# --- results show ---------------------------------------------------------------------


def _fractions(a: AnalysisInfo) -> dict[str, float | None]:
    return {
        "covid19": a.fraction_covid19,
        "other_pneumonia": a.fraction_other_pneumonia,
        "normal": a.fraction_normal,
    }


def _export_json(e: ExportInfo) -> dict[str, Any]:
    return {
        "id": e.id,
        "kind": e.kind,
        "destination": e.destination,
        "sop_instance_uid": e.sop_instance_uid,
        "replaces_sop_instance_uid": e.replaces_sop_instance_uid,
        "state": e.state,
        "attempts": e.attempts,
        "last_status": e.last_status,
        "last_error": e.last_error,
        "created_at": e.created_at,
        "last_attempt_at": e.last_attempt_at,
        "next_attempt_at": e.next_attempt_at if e.state == "pending" else None,
        "delivered_at": e.delivered_at,
    }


def _analysis_json(a: AnalysisInfo) -> dict[str, Any]:
    return {
        "id": a.id,
        "state": a.state,
        "model_name": a.model_name,
        "model_version": a.model_version,
        "model_uid": a.model_uid,
        "manifestation_model_uid": a.manifestation_model_uid,
        "worker": a.worker,
        "device": a.device,
        "attempts": a.attempts,
        "claimed_at": a.claimed_at,
        "finished_at": a.finished_at,
        "series_instance_uid": a.series_instance_uid,
        "series_selection": a.series_selection,
        "slices_total": a.slices_total,
        "slices_analysed": a.slices_analysed,
        "slices_skipped": a.slices_skipped,
        "fractions": _fractions(a),
        "decision": a.decision,
        "threshold": a.threshold,
        "manifestation_counts": a.manifestation_counts,
        "timings": a.timings,
        "failure_reason": a.failure_reason,
        "report_problems": a.report_problems.splitlines() if a.report_problems else [],
        "key_slices": [
            {
                "slice_index": k.slice_index,
                "sop_instance_uid": k.sop_instance_uid,
                "frame_number": k.frame_number,
                "position_z": k.position_z,
                "p_covid19": k.p_covid19,
                "predicted_class": k.predicted_class,
                "manifestation": k.manifestation,
            }
            for k in a.key_slices
        ],
        "exports": [_export_json(e) for e in a.exports],
    }


def _version_json(v: VersionInfo) -> dict[str, Any]:
    return {
        "version": v.version,
        "status": v.status,
        "calling_ae_title": v.calling_ae_title,
        "received_at": v.received_at,
        "last_received_at": v.last_received_at,
        "completed_at": v.completed_at,
        "completion_reason": v.completion_reason,
        "instance_count": v.instance_count,
        "outbox": None
        if v.outbox is None
        else {
            "created_at": v.outbox.created_at,
            "dispatched_at": v.outbox.dispatched_at,
            "attempts": v.outbox.attempts,
            "last_error": v.outbox.last_error,
            "next_attempt_at": None
            if v.outbox.dispatched_at is not None
            else v.outbox.next_attempt_at,
        },
        "analyses": [_analysis_json(a) for a in v.analyses],
        "pruned_at": v.pruned_at,
        "prune_reason": v.prune_reason,
    }


def detail_json(d: StudyDetail, show_phi: bool) -> dict[str, Any]:
    """The documented JSON object of ``ctdx results show``."""
    out: dict[str, Any] = {
        "study_instance_uid": d.study_instance_uid,
        "accession_number": d.accession_number,
    }
    if show_phi:
        out["patient_id"] = d.patient_id
        out["patient_name"] = d.patient_name
    out.update(
        {
            "study_date": d.study_date,
            "study_description": d.study_description,
            "created_at": d.created_at,
            "series": [
                {
                    "series_instance_uid": s.series_instance_uid,
                    "modality": s.modality,
                    "series_number": s.series_number,
                    "series_description": s.series_description,
                    "instance_count": s.instance_count,
                }
                for s in d.series
            ],
            "versions": [_version_json(v) for v in d.versions],
            "audit": [
                {
                    "at": e.at,
                    "actor": e.actor,
                    "action": e.action,
                    "target": e.target,
                    "detail": e.detail,
                }
                for e in d.audit
            ],
        }
    )
    return out


def _kv(rows: Sequence[tuple[str, RenderableType | str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, style="bold", min_width=14)
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(label, Text(value) if isinstance(value, str) else value)
    return grid


def _pairs(values: Mapping[str, Any] | None, fmt: Any = str) -> str:
    if not values:
        return "-"
    return ", ".join(f"{k} {fmt(v)}" for k, v in values.items())


def _export_line(e: ExportInfo) -> str:
    tries = f"{e.attempts} attempt{'s' if e.attempts != 1 else ''}"
    if e.state == "delivered":
        when = f"delivered {local_time(e.delivered_at, seconds=True)}"
    elif e.state == "pending":
        when = f"pending, next attempt {local_time(e.next_attempt_at, seconds=True)}"
    else:
        when = e.state
    line = f"#{e.id} {e.kind.upper()} to {e.destination}: {when} ({tries})"
    if e.last_error and e.state != "delivered":
        status = f" [0x{e.last_status:04X}]" if e.last_status is not None else ""
        line += f"\nlast error{status}: {e.last_error}"
    return line


def _key_slices_table(console: Console, a: AnalysisInfo) -> Table:
    columns = [
        Column("Slice", lambda k: str(k.slice_index), min_width=5, max_width=5, justify="right"),
        Column("z mm", lambda k: "-" if k.position_z is None else f"{k.position_z:.1f}",
               min_width=6, max_width=8, justify="right"),
        Column("P(COVID)", lambda k: f"{k.p_covid19:.3f}", min_width=8, max_width=8,
               justify="right"),
        Column("Class", lambda k: _text(k.predicted_class), min_width=8, max_width=15),
        Column("Manifestation", lambda k: _text(k.manifestation), min_width=8, max_width=20,
               drop=1),
        Column("SOP Instance UID", lambda k: k.sop_instance_uid + (
            f" frame {k.frame_number}" if k.frame_number is not None else ""),
               min_width=16, max_width=80, flex=True, middle=True),
    ]
    return fitted_table(console, columns, a.key_slices)


def _analysis_view(console: Console, a: AnalysisInfo) -> list[RenderableType]:
    rows: list[tuple[str, RenderableType | str]] = [
        ("Analysis", f"#{a.id} {a.state}, {a.model_name} {a.model_version}"),
        ("Model UID", a.model_uid),
        ("Ran on", f"{_text(a.device)} by {_text(a.worker)}, attempt {a.attempts}, "
                   f"{local_time(a.claimed_at, seconds=True)} → "
                   f"{local_time(a.finished_at, seconds=True)}"),
    ]
    if a.failure_reason:
        rows.append(("Failed", a.failure_reason))
    if a.series_instance_uid:
        rows.append(("Series", a.series_instance_uid))
    if a.series_selection:
        rows.append(("Chosen because", a.series_selection))
    if a.slices_total is not None:
        rows.append(("Slices", f"{a.slices_total} total, {_text(a.slices_analysed)} analysed, "
                               f"{_text(a.slices_skipped)} skipped (too little lung)"))
    if a.fraction_covid19 is not None:
        rows.append(("Fractions", f"COVID-19 {percent(a.fraction_covid19)}, other pneumonia "
                                  f"{percent(a.fraction_other_pneumonia)}, normal "
                                  f"{percent(a.fraction_normal)}"))
    if a.decision is not None:
        rows.append(("Decision", f"{a.decision} (COVID-19 threshold {percent(a.threshold)})"))
    if a.manifestation_counts is not None:
        rows.append(("Manifestations", _pairs(a.manifestation_counts)))
    if a.timings:
        rows.append(("Timings", _pairs(a.timings, lambda v: seconds(float(v)))))
    for line in (a.report_problems or "").splitlines():
        rows.append(("Report NOT SENT", Text(line, style="bold red")))
    for e in a.exports:
        rows.append(("Report", _export_line(e)))
        rows.append(("SR UID" if e.kind == "sr" else f"{e.kind.upper()} UID", e.sop_instance_uid))
    out: list[RenderableType] = [_kv(rows)]
    if a.key_slices:
        out.append(Text("Key slices (most COVID-like)", style="bold"))
        out.append(_key_slices_table(console, a))
    return out


def _version_view(console: Console, v: VersionInfo, latest: bool) -> list[RenderableType]:
    title = f"Version {v.version}: {v.status}" + (" (latest)" if latest else "")
    rows: list[tuple[str, RenderableType | str]] = [
        ("Calling AE", _text(v.calling_ae_title)),
        ("Received", f"{local_time(v.received_at, seconds=True)} → "
                     f"{local_time(v.last_received_at, seconds=True)}, "
                     f"{v.instance_count} instances"),
        ("Completed", f"{local_time(v.completed_at, seconds=True)}"
                      + (f" ({v.completion_reason})" if v.completion_reason else "")),
    ]
    if v.outbox is not None:
        o = v.outbox
        queued = (
            f"handed to the queue {local_time(o.dispatched_at, seconds=True)}"
            if o.dispatched_at
            else f"waiting, next attempt {local_time(o.next_attempt_at, seconds=True)}"
        )
        rows.append(("Queue", queued + (f"; last error: {o.last_error}" if o.last_error else "")))
    if v.pruned_at is not None:
        rows.append(("Images", Text(f"pruned from the spool {local_time(v.pruned_at, seconds=True)}"
                                    f" ({v.prune_reason}); results and reports kept",
                                    style="yellow")))
    out: list[RenderableType] = [Text(""), Text(title, style="bold underline"), _kv(rows)]
    for a in v.analyses:
        out.extend(_analysis_view(console, a))
    return out


def _audit_line(e: AuditInfo) -> str:
    before = (e.detail or {}).get("previous_state")
    suffix = f" (was {before})" if before else ""
    target = f" export {e.target}" if e.action.startswith("exports.") else ""
    return f"{local_time(e.at)} {e.actor}: {e.action}{target}{suffix}"


def detail_view(console: Console, d: StudyDetail, show_phi: bool) -> Group:
    """``ctdx results show`` for a person; times are local."""
    rows: list[tuple[str, RenderableType | str]] = [
        ("Study UID", d.study_instance_uid),
        ("Accession", _text(d.accession_number)),
    ]
    if show_phi:
        rows += [("Patient ID", _text(d.patient_id)), ("Patient name", _text(d.patient_name))]
    rows += [
        ("Study date", _text(d.study_date)),
        ("Description", _text(d.study_description)),
    ]
    for s in d.series:
        rows.append((
            "Series",
            f"{s.series_instance_uid}\n#{_text(s.series_number)} {_text(s.modality)} "
            f"{_text(s.series_description)}, {s.instance_count} instances",
        ))
    parts: list[RenderableType] = [_kv(rows)]
    for v in d.versions:
        parts.extend(_version_view(console, v, latest=v is d.versions[-1]))
    if d.audit:
        parts += [Text(""), Text("Operator actions", style="bold underline")]
        parts += [Text(_audit_line(e)) for e in d.audit]
    if not show_phi:
        parts += [Text(""), Text("Patient name and ID hidden; --show-phi prints them.",
                                 style="dim")]
    return Group(*parts)


# --- results stats --------------------------------------------------------------------


def stats_json(s: Stats) -> dict[str, Any]:
    return {
        "since": s.since,
        "until": s.until,
        "study_versions": s.study_versions,
        "by_status": s.by_status,
        "by_decision": s.by_decision,
        "exports_by_state": s.exports_by_state,
        "turnaround_seconds": {
            "count": s.turnaround.count,
            "median": s.turnaround.median_seconds,
            "p95": s.turnaround.p95_seconds,
            "max": s.turnaround.max_seconds,
        },
        "analysis_failures": [{"reason": r.reason, "count": r.count} for r in s.analysis_failures],
        "dead_exports": [{"reason": r.reason, "count": r.count} for r in s.dead_exports],
    }


def stats_csv_rows(s: Stats) -> list[dict[str, Any]]:
    """Long form (section, key, value): one line per number, easy to pivot in a spreadsheet."""
    rows: list[dict[str, Any]] = [
        {"section": "period", "key": "since", "value": iso_utc(s.since)},
        {"section": "period", "key": "until", "value": iso_utc(s.until)},
        {"section": "study_versions", "key": "total", "value": s.study_versions},
    ]
    for section, counts in (
        ("by_status", s.by_status),
        ("by_decision", s.by_decision),
        ("exports_by_state", s.exports_by_state),
    ):
        rows += [{"section": section, "key": k, "value": v} for k, v in counts.items()]
    t = s.turnaround
    rows += [
        {"section": "turnaround_seconds", "key": key, "value": value}
        for key, value in (
            ("count", t.count), ("median", t.median_seconds), ("p95", t.p95_seconds),
            ("max", t.max_seconds),
        )
    ]
    rows += [{"section": "analysis_failures", "key": r.reason, "value": r.count}
             for r in s.analysis_failures]
    rows += [{"section": "dead_exports", "key": r.reason, "value": r.count}
             for r in s.dead_exports]
    return rows


def _period_text(since: datetime | None, until: datetime | None) -> str:
    if since is None and until is None:
        return "all time"
    return f"{local_time(since) if since else 'the beginning'} to " \
           f"{local_time(until) if until else 'now'}"


def _counts_table(console: Console, title: str, items: Sequence[tuple[str, int]]) -> Table:
    columns = [
        Column("Count", lambda r: str(r[1]), min_width=5, max_width=8, justify="right"),
        Column(title, lambda r: r[0], min_width=10, max_width=200, flex=True),
    ]
    return fitted_table(console, columns, items)


def stats_view(console: Console, s: Stats) -> Group:
    t = s.turnaround
    rows: list[tuple[str, RenderableType | str]] = [
        ("Period", f"{_period_text(s.since, s.until)} (when the study version started arriving)"),
        ("Study versions", str(s.study_versions)),
        ("By status", _pairs(s.by_status)),
        ("By decision", _pairs(s.by_decision)),
        ("Reports", _pairs(s.exports_by_state)),
        ("Turnaround", "no report delivered" if t.count == 0 else
         f"median {seconds(t.median_seconds)}, 95th percentile {seconds(t.p95_seconds)}, "
         f"max {seconds(t.max_seconds)} over {t.count} delivered SRs "
         "(study complete → SR delivered)"),
    ]
    parts: list[RenderableType] = [_kv(rows)]
    if s.analysis_failures:
        parts += [Text(""), _counts_table(console, "Analysis failure reason",
                                          [(r.reason, r.count) for r in s.analysis_failures])]
    if s.dead_exports:
        parts += [Text(""), _counts_table(console, "Dead export, last error",
                                          [(r.reason, r.count) for r in s.dead_exports])]
    return Group(*parts)
