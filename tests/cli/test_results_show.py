"""`ctdx results show`: one study in full, by UID or accession number, table and json."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cli.conftest import Filled, ctdx, flat

PHI = ("DOE^JANE", "PID-0001")


def _show(filled: Filled, key: str, *args: str) -> dict[str, Any]:
    result = ctdx("results", "show", key, "-f", "json", "--database-url", filled.url, *args)
    assert result.exit_code == 0, result.output
    detail = json.loads(result.stdout)
    assert isinstance(detail, dict)
    return detail


def test_json_by_accession_has_every_part_of_the_result(filled: Filled) -> None:
    sc = filled.scenario
    d = _show(filled, "ACC-COVID")
    assert list(d) == [
        "study_instance_uid", "accession_number", "study_date", "study_description",
        "created_at", "series", "versions", "audit",
    ]
    assert d["study_instance_uid"] == sc.uids["covid"] and d["audit"] == []
    assert d["series"] == [{
        "series_instance_uid": sc.extra["covid_series_uid"], "modality": "CT",
        "series_number": 2, "series_description": "LUNG 1.25mm", "instance_count": 4,
    }]
    (version,) = d["versions"]
    assert version["version"] == 1 and version["status"] == "analysed"
    assert version["completed_at"].endswith("Z") and version["completion_reason"] == "quiet"
    assert version["outbox"]["dispatched_at"] is not None
    (analysis,) = version["analyses"]
    assert analysis["series_instance_uid"] == sc.extra["covid_series_uid"]
    assert analysis["series_selection"] == "most slices; lung kernel"
    assert analysis["fractions"] == {"covid19": 0.5, "other_pneumonia": 0.1, "normal": 0.4}
    assert analysis["decision"] == "covid19" and analysis["threshold"] == 0.05
    assert (analysis["slices_total"], analysis["slices_analysed"], analysis["slices_skipped"]) \
        == (12, 10, 2)
    assert analysis["manifestation_counts"]["ground_glass_opacity"] == 4
    assert analysis["timings"]["classification"] == 7.0
    keys = analysis["key_slices"]
    assert [k["p_covid19"] for k in keys] == pytest.approx(sc.key_slice_p[:5])
    assert keys[0]["slice_index"] == 0 and keys[0]["manifestation"] == "ground_glass_opacity"
    (sr,) = analysis["exports"]
    assert sr["id"] == sc.exports["covid"] and sr["kind"] == "sr"
    assert sr["state"] == "delivered" and sr["attempts"] == 1
    assert sr["delivered_at"].endswith("Z") and sr["sop_instance_uid"].startswith("1.2.")


def test_json_by_uid_equals_json_by_accession(filled: Filled) -> None:
    assert _show(filled, filled.scenario.uids["covid"]) == _show(filled, "ACC-COVID")


def test_versions_oldest_first_and_failed_reason(filled: Filled) -> None:
    d = _show(filled, "ACC-V2")
    assert [(v["version"], v["status"]) for v in d["versions"]] == [(1, "analysed"), (2, "queued")]
    assert d["versions"][1]["analyses"] == []
    failed = _show(filled, filled.scenario.uids["failed"])
    assert failed["accession_number"] is None
    analysis = failed["versions"][0]["analyses"][0]
    assert analysis["state"] == "failed" and analysis["failure_reason"].startswith("no usable CT")


def test_key_slices_option_and_phi(filled: Filled) -> None:
    d = _show(filled, "ACC-COVID", "--key-slices", "2")
    assert len(d["versions"][0]["analyses"][0]["key_slices"]) == 2
    assert "patient_name" not in d and "patient_id" not in d
    with_phi = _show(filled, "ACC-COVID", "--show-phi")
    assert list(with_phi)[:4] == [
        "study_instance_uid", "accession_number", "patient_id", "patient_name"
    ]
    assert (with_phi["patient_id"], with_phi["patient_name"]) == ("PID-0001", "DOE^JANE")


def test_table_shows_result_in_80_columns_without_phi(filled: Filled) -> None:
    sc = filled.scenario
    result = ctdx("results", "show", "ACC-DEAD", "--database-url", filled.url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    text = result.stdout
    assert sc.uids["dead"] in text  # whole, on its own line: copyable
    for phrase in ("Version 1: analysed (latest)", "COVID-19 1.0%", "normal 95.0%",
                   "threshold 5.0%", "dead (8 attempts)",
                   "association rejected: called AE title not recognised",
                   "Key slices", "hidden; --show-phi"):
        assert phrase in flat(text), phrase
    assert "ROE^RICHARD" not in text and "PID-0002" not in text
    shown = ctdx("results", "show", "ACC-DEAD", "--show-phi", "--database-url", filled.url)
    assert "ROE^RICHARD" in shown.stdout and "PID-0002" in shown.stdout
    assert "hidden" not in shown.stdout


def test_unknown_study_exits_4(filled: Filled) -> None:
    for fmt in ("table", "json"):
        result = ctdx("results", "show", "1.2.3.4.5", "-f", fmt, "--database-url", filled.url)
        assert result.exit_code == 4
        assert "no study with Study Instance UID or accession number '1.2.3.4.5'" in flat(
            result.stderr
        )
        assert result.stdout == ""


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_key_slices_of_an_enhanced_ct_name_their_frame(db_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    from ctdx.db import migrate
    from ctdx.db.models import VersionState
    from ctdx.db.session import make_engine, session_scope
    from tests.cli.factories import add_analysis, add_series, add_study, add_version

    migrate.upgrade(db_url)
    now = datetime.now(UTC)
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        study = add_study(s, "enhanced", accession_number="ACC-ENH", created_at=now)
        version = add_version(s, study, state=VersionState.ANALYSED, calling_ae_title="CT1",
                              received_at=now, instance_count=1,
                              completed_at=now + timedelta(seconds=1))
        series = add_series(s, study, version, "enhanced-series", instances=1)
        add_analysis(s, version, decision="covid19", fractions=(0.5, 0.0, 0.5), series=series,
                     p_covid=(0.2, 0.9, 0.6), frames=True)
    engine.dispose()
    result = ctdx("results", "show", "ACC-ENH", "-f", "json", "--database-url", db_url)
    assert result.exit_code == 0, result.output
    keys = json.loads(result.stdout)["versions"][0]["analyses"][0]["key_slices"]
    assert [(k["slice_index"], k["frame_number"]) for k in keys] == [(1, 2), (2, 3), (0, 1)]
    assert len({k["sop_instance_uid"] for k in keys}) == 1
    table = ctdx("results", "show", "ACC-ENH", "--database-url", db_url, columns=200)
    assert table.exit_code == 0, table.output
    assert "frame 2" in flat(table.stdout)
