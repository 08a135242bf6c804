"""`ctdx results stats`: counts, turnaround percentiles, failures by reason, three formats."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np
import pytest

from ctdx.db.cli.views import STATS_CSV_FIELDS
from tests.cli.conftest import Filled, ctdx, flat

FAILURE = "no usable CT series: no axial CT series with 20 slices or more"
DEAD = "association rejected: called AE title not recognised"


def _stats(filled: Filled, *args: str) -> dict[str, Any]:
    result = ctdx("results", "stats", "-f", "json", "--database-url", filled.url, *args)
    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def test_all_time_json(filled: Filled) -> None:
    s = _stats(filled)
    assert s["since"] is None and s["until"] is None
    assert s["study_versions"] == 7
    assert s["by_status"] == {"analysed": 4, "failed": 1, "queued": 1, "receiving": 1}
    assert s["by_decision"] == {"covid19": 2, "normal": 1, "other_pneumonia": 1}
    assert s["exports_by_state"] == {"dead": 1, "delivered": 3, "pending": 1}
    # SR deliveries 12 s and 30 s after completion (the SC is not a report turnaround)
    turnaround = s["turnaround_seconds"]
    assert turnaround["count"] == 2
    assert turnaround["median"] == pytest.approx(21.0)
    assert turnaround["p95"] == pytest.approx(float(np.percentile([12.0, 30.0], 95)))
    assert turnaround["max"] == pytest.approx(30.0)
    assert s["analysis_failures"] == [{"reason": FAILURE, "count": 1}]
    assert s["dead_exports"] == [{"reason": DEAD, "count": 1}]


def test_period_today(filled: Filled) -> None:
    s = _stats(filled, "--since", "today")
    assert s["since"].endswith("Z") and s["until"] is None
    assert s["study_versions"] == 4
    assert s["by_status"] == {"analysed": 2, "queued": 1, "receiving": 1}
    assert s["by_decision"] == {"covid19": 1, "normal": 1}
    assert s["turnaround_seconds"] == {"count": 1, "median": 12.0, "p95": 12.0, "max": 12.0}
    assert s["analysis_failures"] == []
    empty = _stats(filled, "--since", "2000-01-01", "--until", "2000-01-02")
    assert empty["study_versions"] == 0 and empty["by_status"] == {}
    assert empty["turnaround_seconds"] == {"count": 0, "median": None, "p95": None, "max": None}


def test_csv_long_form(filled: Filled) -> None:
    result = ctdx("results", "stats", "-f", "csv", "--database-url", filled.url)
    assert result.exit_code == 0
    reader = csv.DictReader(io.StringIO(result.stdout))
    assert tuple(reader.fieldnames or ()) == STATS_CSV_FIELDS
    values = {(row["section"], row["key"]): row["value"] for row in reader}
    assert values[("study_versions", "total")] == "7"
    assert values[("by_status", "analysed")] == "4"
    assert values[("by_decision", "covid19")] == "2"
    assert float(values[("turnaround_seconds", "median")]) == pytest.approx(21.0)
    assert values[("analysis_failures", FAILURE)] == "1"
    assert values[("dead_exports", DEAD)] == "1"
    assert values[("period", "since")] == ""


def test_table(filled: Filled) -> None:
    result = ctdx("results", "stats", "--database-url", filled.url)
    assert result.exit_code == 0
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    text = flat(result.stdout)
    for phrase in ("Study versions 7", "analysed 4, failed 1, queued 1, receiving 1",
                   "covid19 2, normal 1, other_pneumonia 1", "median 21.0 s",
                   "95th percentile 29.1 s", FAILURE, DEAD):
        assert phrase in text, phrase
