"""`ctdx results list`: filters, order, the three formats, PHI hiding, 80 columns."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime

import pytest

from ctdx.db.cli.views import STUDY_FIELDS
from tests.cli.conftest import Filled, ctdx

NEWEST_FIRST = ["requeued", "receiving", "dead", "covid", "pneumonia", "failed"]
PHI = ("DOE^JANE", "ROE^RICHARD", "PID-0001", "PID-0002", "DOE^")


def _json(filled: Filled, *args: str) -> list[dict[str, object]]:
    result = ctdx("results", "list", "--format", "json", "--database-url", filled.url, *args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def _names(filled: Filled, rows: list[dict[str, object]]) -> list[str]:
    by_uid = {uid: name for name, uid in filled.scenario.uids.items()}
    return [by_uid[str(row["study_instance_uid"])] for row in rows]


def test_json_rows_are_newest_first_with_documented_fields(filled: Filled) -> None:
    rows = _json(filled)
    assert _names(filled, rows) == NEWEST_FIRST
    for row in rows:
        assert tuple(row) == STUDY_FIELDS  # names and order are the contract
        received = datetime.fromisoformat(str(row["received_at"]))
        assert str(row["received_at"]).endswith("Z") and received.utcoffset() is not None
    by_name = dict(zip(_names(filled, rows), rows, strict=True))
    covid = by_name["covid"]
    assert covid["status"] == "analysed" and covid["decision"] == "covid19"
    assert covid["fraction_covid19"] == pytest.approx(0.5)
    assert covid["report_state"] == "delivered"
    assert covid["calling_ae_title"] == "CT_SCANNER_01"
    assert covid["model_version"] == "1.0.0" and covid["version"] == 1
    assert covid["study_date"] == "2026-05-01"
    assert by_name["dead"]["report_state"] == "dead"  # the worst export state wins
    assert by_name["pneumonia"]["report_state"] == "pending"
    receiving = by_name["receiving"]
    assert receiving["status"] == "receiving" and receiving["completed_at"] is None
    assert receiving["decision"] is None and receiving["report_state"] is None
    requeued = by_name["requeued"]  # described by its newest version
    assert requeued["version"] == 2 and requeued["status"] == "queued"
    assert requeued["decision"] is None
    assert by_name["failed"]["accession_number"] is None
    assert by_name["failed"]["analysis_state"] == "failed"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--since", "today"], ["requeued", "receiving", "dead", "covid"]),
        (["--since", "yesterday", "--until", "yesterday"], ["pneumonia"]),
        (["--until", "yesterday"], ["pneumonia", "failed"]),
        (["--since", "7d"], NEWEST_FIRST),
        (["--since", "2h", "--status", "failed"], []),
        (["--decision", "covid19"], ["covid"]),
        (["--decision", "other_pneumonia"], ["pneumonia"]),
        (["--status", "failed"], ["failed"]),
        (["--status", "RECEIVING"], ["receiving"]),
        (["--calling-ae", "CT02"], ["requeued", "dead"]),
        (["--limit", "2"], ["requeued", "receiving"]),
    ],
)
def test_filters(filled: Filled, args: list[str], expected: list[str]) -> None:
    assert _names(filled, _json(filled, *args)) == expected


def test_csv_has_the_json_fields_and_empty_nulls(filled: Filled) -> None:
    result = ctdx("results", "list", "-f", "csv", "--database-url", filled.url)
    assert result.exit_code == 0, result.output
    reader = csv.DictReader(io.StringIO(result.stdout))
    assert tuple(reader.fieldnames or ()) == STUDY_FIELDS
    rows = {row["study_instance_uid"]: row for row in reader}
    assert len(rows) == 6
    covid = rows[filled.scenario.uids["covid"]]
    assert covid["decision"] == "covid19" and float(covid["fraction_covid19"]) == 0.5
    assert covid["received_at"].endswith("Z")
    receiving = rows[filled.scenario.uids["receiving"]]
    assert receiving["completed_at"] == "" and receiving["decision"] == ""
    assert not any(marker in result.stdout for marker in PHI)


def test_phi_only_with_show_phi(filled: Filled) -> None:
    for fmt in ("table", "json", "csv"):
        hidden = ctdx("results", "list", "-f", fmt, "--database-url", filled.url)
        assert hidden.exit_code == 0
        assert not any(marker in hidden.stdout for marker in PHI), fmt
        assert "ACC-COVID" in hidden.stdout  # the accession number is not hidden
    rows = _json(filled, "--show-phi")
    covid = next(r for r in rows if r["accession_number"] == "ACC-COVID")
    assert covid["patient_name"] == "DOE^JANE" and covid["patient_id"] == "PID-0001"
    assert list(covid)[1:4] == ["accession_number", "patient_id", "patient_name"]
    shown = ctdx("results", "list", "-f", "csv", "--show-phi", "--database-url", filled.url)
    header = next(csv.reader(io.StringIO(shown.stdout)))
    assert header[:4] == ["study_instance_uid", "accession_number", "patient_id", "patient_name"]
    table = ctdx("results", "list", "--show-phi", "--database-url", filled.url)
    assert table.exit_code == 0 and "PID-0001" in table.stdout and "DOE^JANE" in table.stdout


@pytest.mark.parametrize("show_phi", [False, True])
def test_table_fits_80_columns_and_shortens_uids_in_the_middle(
    filled: Filled, show_phi: bool
) -> None:
    args = ["results", "list", "--database-url", filled.url] + (["--show-phi"] if show_phi else [])
    result = ctdx(*args, columns=80)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    if show_phi:  # patient and accession identify the rows; the UID column gives way
        assert lines[0].split()[:2] == ["Received", "Accessi…"]
        line = next(line for line in lines if "PID-0001" in line)
        assert "DOE^JANE" in line and "covid19" in line and "50.0%" in line
        return
    assert lines[0].split()[:3] == ["Received", "Study", "UID"]
    covid_uid = filled.scenario.uids["covid"]
    line = next(line for line in lines if "ACC-COVID" in line)
    assert covid_uid not in line and "…" in line
    shown = next(part for part in line.split() if "…" in part)
    head, tail = shown.split("…")
    assert covid_uid.startswith(head) and covid_uid.endswith(tail) and len(tail) >= 4
    for word in ("analysed", "covid19", "50.0%", "delivered"):
        assert word in line
    assert "dead" in next(line for line in lines if "ACC-DEAD" in line)


def test_wide_terminal_shows_whole_uids_and_more_columns(filled: Filled) -> None:
    result = ctdx("results", "list", "--database-url", filled.url, columns=200)
    assert result.exit_code == 0
    assert filled.scenario.uids["covid"] in result.stdout
    header = result.stdout.splitlines()[0]
    assert "Calling AE" in header and "Model" in header
    assert "CT_SCANNER_01" in result.stdout and "ctdx-resnet50-test 1.0.0" in result.stdout


def test_empty_result_says_so(filled: Filled) -> None:
    result = ctdx("results", "list", "--status", "processing", "--database-url", filled.url)
    assert result.exit_code == 0 and "No studies match" in result.stdout
    as_json = ctdx("results", "list", "--status", "processing", "-f", "json",
                   "--database-url", filled.url)
    assert json.loads(as_json.stdout) == []
    as_csv = ctdx("results", "list", "--status", "processing", "-f", "csv",
                  "--database-url", filled.url)
    assert as_csv.stdout.splitlines() == [",".join(STUDY_FIELDS)]
