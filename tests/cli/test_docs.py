"""docs/cli-json.md describes exactly the fields the commands print, in their order."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ctdx.db.cli.views import EXPORT_FIELDS, PHI_FIELDS, STUDY_FIELDS
from tests.cli.conftest import Filled, ctdx

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli-json.md"
ROW = re.compile(r"^\|\s*`([a-z0-9_]+)`\s*\|", re.MULTILINE)


def _sections() -> dict[str, list[list[str]]]:
    """Heading -> the field names of each table under it."""
    sections: dict[str, list[list[str]]] = {}
    heading = ""
    for block in re.split(r"^(#{2,3} .+)$", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE):
        if block.startswith("#"):
            heading = block.lstrip("#").strip()
            continue
        tables = [ROW.findall(t) for t in re.split(r"\n\s*\n", block) if ROW.search(t)]
        sections[heading] = tables
    return sections


def _fields(heading: str, table: int = 0) -> list[str]:
    return _sections()[heading][table]


def test_listing_fields_are_documented_in_order() -> None:
    assert tuple(_fields("`ctdx results list`")) == STUDY_FIELDS
    assert tuple(_fields("`ctdx results list`", 1)) == PHI_FIELDS
    assert tuple(_fields("`ctdx exports list`")) == EXPORT_FIELDS


def _show(filled: Filled) -> dict[str, Any]:
    result = ctdx("results", "show", "ACC-DEAD", "-f", "json", "--database-url", filled.url)
    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def test_show_objects_are_documented_in_order(filled: Filled) -> None:
    d = _show(filled)
    version = d["versions"][0]
    analysis = version["analyses"][0]
    objects = {
        "study": d,
        "version": version,
        "outbox": version["outbox"],
        "analysis": analysis,
        "key slice": analysis["key_slices"][0],
        "export": analysis["exports"][0],
    }
    for heading, obj in objects.items():
        assert list(obj) == _fields(heading), heading
    covid = json.loads(ctdx("results", "show", "ACC-COVID", "-f", "json", "--database-url",
                            filled.url).stdout)  # the study with a series row
    assert list(covid["series"][0]) == _fields("series")


def test_stats_fields_are_documented(filled: Filled) -> None:
    result = ctdx("results", "stats", "-f", "json", "--database-url", filled.url)
    assert list(json.loads(result.stdout)) == _fields("`ctdx results stats`")


def test_audit_entry_fields_are_documented(scenario_db: Filled) -> None:
    uid = scenario_db.scenario.uids["failed"]
    assert ctdx("studies", "requeue", uid, "--database-url", scenario_db.url).exit_code == 0
    result = ctdx("results", "show", uid, "-f", "json", "--database-url", scenario_db.url)
    (entry,) = json.loads(result.stdout)["audit"]
    assert list(entry) == _fields("audit entry")
    assert entry["action"] == "studies.requeue" and entry["detail"]["previous_state"] == "failed"


def test_exit_codes_table_matches_the_code() -> None:
    from ctdx.db.cli import common as cli_common

    text = DOC.read_text(encoding="utf-8")
    documented = {int(code) for code in re.findall(r"^\| (\d) \|", text, flags=re.MULTILINE)}
    codes = {
        value for name, value in vars(cli_common).items()
        if name.startswith("EXIT_") and isinstance(value, int)
    }
    assert documented == codes
