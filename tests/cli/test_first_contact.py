"""What a new user meets first (issue 16): help that reads, tables that tell studies apart,
exports that do not promise a next attempt after delivery, quiet library logs."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctdx.db import migrate
from ctdx.db.cli.output import distinct_middle
from ctdx.db.logs import configure_logging
from ctdx.db.models import Study, VersionState
from ctdx.db.session import make_engine, session_scope
from tests.cli.conftest import Filled, ctdx
from tests.cli.factories import add_analysis, add_version

# Two real studies of one scanner without accession numbers (COVID-CT-MD): same root,
# same last eight digits; they differ in the middle (the acquisition date and time).
REAL_UIDS = (
    "1.3.12.2.1107.5.1.4.93005.30000020030507283104800000079",
    "1.3.12.2.1107.5.1.4.93005.30000020041107154224500000079",
)


# --- help ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["--help"], ["worker", "--help"], ["train", "export",
                                                                         "--help"]])
def test_help_shows_no_type_for_flags(command: list[str]) -> None:
    result = ctdx(*command)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output


def test_worker_help_gives_descriptions_room_at_80_columns() -> None:
    result = ctdx("worker", "--help", columns=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines)
    # each description starts on the option's line and reads in long runs, not a word per line
    concurrency = next(line for line in lines if "--concurrency" in line)
    assert "Analyses at a time on this machine" in concurrency
    # the --no- form sits under its flag instead of in a column of its own
    flag = next(i for i, line in enumerate(lines) if "--export-delivery" in line)
    assert "--no-export-delivery" in lines[flag + 1]
    assert "Also deliver pending report exports" in lines[flag]


# --- results list: two studies without accession numbers ---------------------------------


@pytest.fixture
def two_real_studies(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'ctdx.sqlite3'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        for i, study_uid in enumerate(REAL_UIDS):
            study = Study(study_instance_uid=study_uid, accession_number=None,
                          created_at=now - timedelta(minutes=10 - i))
            session.add(study)
            session.flush()
            version = add_version(session, study, state=VersionState.ANALYSED,
                                  calling_ae_title="SCANNER",
                                  received_at=now - timedelta(minutes=10 - i))
            add_analysis(session, version, decision="other_pneumonia",
                         fractions=(0.02, 0.9, 0.08))
    engine.dispose()
    yield url


def _uid_cells(output: str) -> list[str]:
    return [line.split()[2] for line in output.splitlines() if re.match(r"\d\d-\d\d ", line)]


def test_results_list_tells_two_studies_without_accession_apart_at_80_columns(
        two_real_studies: str) -> None:
    result = ctdx("results", "list", "--database-url", two_real_studies, columns=80)
    assert result.exit_code == 0, result.output
    cells = _uid_cells(result.output)
    assert len(cells) == 2, result.output
    assert cells[0] != cells[1], result.output
    # what is shown are parts of each study's own UID, in order
    for cell, full in zip(cells, reversed(REAL_UIDS), strict=True):
        rest = full
        for part in filter(None, cell.split("…")):
            assert part in rest, (cell, full)
            rest = rest[rest.index(part) + len(part):]


@given(st.lists(st.from_regex(r"1\.2\.840\.[0-9]{1,4}(\.[0-9]{1,12}){2,6}", fullmatch=True),
                min_size=1, max_size=8),
       st.integers(min_value=8, max_value=40))
def test_distinct_middle_keeps_width_and_tells_apart_what_fits(values: list[str],
                                                               width: int) -> None:
    shown = distinct_middle(values, width)
    assert len(shown) == len(values)
    assert all(len(s) <= width for s in shown)
    for value, s in zip(values, shown, strict=True):
        if len(value) <= width:
            assert s == value
    assert distinct_middle(list(REAL_UIDS), width)[0] != distinct_middle(list(REAL_UIDS),
                                                                          width)[1]


# --- exports: no next attempt once delivered or dead ---------------------------------------


def test_exports_list_gives_next_attempt_only_for_pending_exports(filled: Filled) -> None:
    result = ctdx("exports", "list", "-f", "json", "--database-url", filled.url)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    states = {str(r["state"]) for r in rows}
    assert {"delivered", "pending", "dead"} <= states
    for row in rows:
        if row["state"] == "pending":
            assert row["next_attempt_at"] is not None
        else:
            assert row["next_attempt_at"] is None, row


def test_results_show_gives_next_attempt_only_for_pending_exports(filled: Filled) -> None:
    study = filled.scenario.uids["covid"]
    result = ctdx("results", "show", study, "-f", "json", "--database-url", filled.url)
    assert result.exit_code == 0, result.output
    detail = json.loads(result.stdout)
    exports = [e for v in detail["versions"] for a in v["analyses"] for e in a["exports"]]
    assert exports and all(e["state"] == "delivered" for e in exports)
    assert all(e["next_attempt_at"] is None for e in exports)
    outboxes = [v["outbox"] for v in detail["versions"] if v["outbox"] is not None]
    assert outboxes and all(o["next_attempt_at"] is None for o in outboxes
                            if o["dispatched_at"] is not None)


def test_results_show_has_the_formats_the_readme_names() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "`results show`\ntakes `--format table|json`" in readme
    result = ctdx("results", "show", "X", "--format", "csv")
    assert result.exit_code == 2  # csv is refused, as the README says


# --- logs --------------------------------------------------------------------------------


def test_alembic_and_highdicom_info_lines_only_at_debug() -> None:
    try:
        configure_logging("INFO")
        for name in ("alembic.runtime.migration", "highdicom.sr.templates"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO)
            assert logging.getLogger(name).isEnabledFor(logging.WARNING)
        configure_logging("DEBUG")
        for name in ("alembic.runtime.migration", "highdicom.sr.templates"):
            assert logging.getLogger(name).isEnabledFor(logging.INFO)
    finally:
        configure_logging("WARNING")


def test_a_migration_at_info_prints_no_alembic_lines(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    try:
        migrate.upgrade(f"sqlite:///{tmp_path / 'ctdx.sqlite3'}")
    finally:
        configure_logging("WARNING")
    err = capsys.readouterr().err
    assert "alembic" not in err and "Running upgrade" not in err
