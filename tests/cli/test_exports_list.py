"""`ctdx exports list`: which reports reached PACS, which did not and why."""

from __future__ import annotations

import csv
import io
import json

import pytest

from ctdx.db.cli.views import EXPORT_FIELDS
from tests.cli.conftest import Filled, ctdx, flat


def _json(filled: Filled, *args: str) -> list[dict[str, object]]:
    result = ctdx("exports", "list", "-f", "json", "--database-url", filled.url, *args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def test_json_newest_first_with_documented_fields(filled: Filled) -> None:
    sc = filled.scenario
    rows = _json(filled)
    assert len(rows) == 5
    for row in rows:
        assert tuple(row) == EXPORT_FIELDS
    created = [str(r["created_at"]) for r in rows]
    assert created == sorted(created, reverse=True)
    dead = next(r for r in rows if r["id"] == sc.exports["dead"])
    assert dead["state"] == "dead" and dead["attempts"] == 8 and dead["kind"] == "sr"
    assert dead["study_instance_uid"] == sc.uids["dead"] and dead["accession_number"] == "ACC-DEAD"
    assert dead["delivered_at"] is None and dead["last_status"] is None
    assert str(dead["last_error"]).startswith("association rejected")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--state", "dead"], ["dead"]),
        (["--state", "pending"], ["pending"]),
        (["--state", "delivered", "--since", "today"], ["dead_sc", "covid"]),
        (["--study", "ACC-DEAD"], ["dead_sc", "dead"]),
        (["--until", "yesterday"], ["pending", "v1"]),
        (["--limit", "1"], ["dead_sc"]),
    ],
)
def test_filters(filled: Filled, args: list[str], expected: list[str]) -> None:
    names = {export_id: name for name, export_id in filled.scenario.exports.items()}
    assert [names[int(str(r["id"]))] for r in _json(filled, *args)] == expected


def test_csv_and_table(filled: Filled) -> None:
    sc = filled.scenario
    result = ctdx("exports", "list", "--state", "dead", "-f", "csv", "--database-url", filled.url)
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [int(r["id"]) for r in rows] == [sc.exports["dead"]]
    assert rows[0]["delivered_at"] == "" and rows[0]["attempts"] == "8"
    assert list(rows[0]) == list(EXPORT_FIELDS)
    table = ctdx("exports", "list", "--state", "dead", "--database-url", filled.url)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split()[:2] == ["ID", "Created"] and "Last error" in lines[0]
    row = next(line for line in lines if line.lstrip().startswith(str(sc.exports["dead"])))
    assert "dead" in row and " 8 " in row and "association rejected" in row


def test_unknown_study_filter_exits_4(filled: Filled) -> None:
    result = ctdx("exports", "list", "--study", "NOPE", "--database-url", filled.url)
    assert result.exit_code == 4 and "no study" in flat(result.stderr)
