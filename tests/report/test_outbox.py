"""The export outbox without a network: backoff, claims, destinations, the no-PACS mode."""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from ctdx.db.models import Export, utcnow
from ctdx.db.session import make_engine, session_scope
from ctdx.worker.report import DeliveryLoop, publish_reports
from ctdx.worker.report.outbox import (
    Destination,
    StoredObject,
    backoff_seconds,
    claim_due,
    claim_lease,
    list_exports,
    record_delivered,
    record_exports,
)
from tests.report.conftest import AnalysedStudy, add_analysis, settings_for


def test_backoff_doubles_up_to_the_cap_and_spans_hours(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        export_backoff_seconds=30,
        export_backoff_max_seconds=3600,
        export_max_attempts=12,
    )
    rng = random.Random(7)
    delays = [backoff_seconds(n, settings, rng) for n in range(1, settings.export_max_attempts)]
    for attempt, delay in enumerate(delays, start=1):
        expected = min(30 * 2 ** (attempt - 1), 3600)
        assert 0.9 * expected <= delay <= 1.1 * expected
    assert 4 * 3600 < sum(delays) < 6 * 3600  # the defaults retry for about five hours


def test_destination_round_trips_and_rejects_garbage() -> None:
    destination = Destination("PACS_1", "pacs.example.org", 11112)
    assert Destination.parse(str(destination)) == destination
    assert str(destination) == "PACS_1@pacs.example.org:11112"
    for bad in ("PACS", "@host:104", "PACS@host", "PACS@host:port"):
        with pytest.raises(ValueError, match="destination"):
            Destination.parse(bad)


def test_without_a_pacs_reports_are_built_but_not_recorded(
    report_engine: Engine, data_dir: Path, analysed: AnalysedStudy
) -> None:
    publish_reports(report_engine, analysed.analysis_id, settings_for(data_dir))
    assert len(list((data_dir / "reports").rglob("sr-*.dcm"))) == 1
    assert not list((data_dir / "reports").rglob(".tmp-*"))  # no temporary file left behind
    with session_scope(report_engine) as s:
        assert s.scalar(select(func.count()).select_from(Export)) == 0


def test_a_due_export_is_claimed_once_and_a_lost_claim_records_nothing(
    db_url: str, tmp_path: Path
) -> None:
    engine = make_engine(db_url)
    try:
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        study = add_analysis(engine, data_dir, n_slices=6, size=32)
        settings = settings_for(data_dir)
        now = utcnow()
        [export_id] = record_exports(
            engine,
            study.analysis_id,
            [StoredObject("sr", "2.25.99", "reports/x.dcm")],
            Destination("PACS", "127.0.0.1", 104),
            now,
        )
        # recording the same object again keeps the one row
        assert record_exports(
            engine,
            study.analysis_id,
            [StoredObject("sr", "2.25.99", "reports/x.dcm")],
            Destination("PACS", "127.0.0.1", 104),
            now,
        ) == [export_id]
        [first] = claim_due(engine, settings, now)
        assert (first.id, first.attempts) == (export_id, 1)
        assert claim_due(engine, settings, now) == []  # claimed: not due for anyone else
        # the claimant vanished; after its lease another loop takes the export over
        later = now + claim_lease(settings) + timedelta(seconds=1)
        [second] = claim_due(engine, settings, later)
        assert second.attempts == 2 and second.token != first.token
        assert record_delivered(engine, first, 0, later) is False  # the old claim records nothing
        with session_scope(engine) as s:
            [view] = list_exports(s)
        assert view.state == "pending"
        assert record_delivered(engine, second, 0, later) is True
        with session_scope(engine) as s:
            [view] = list_exports(s)
        assert (view.state, view.last_status, view.attempts) == ("delivered", 0, 2)
    finally:
        engine.dispose()


def test_delivery_loop_survives_a_database_without_tables(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    try:
        loop = DeliveryLoop(engine, settings_for(tmp_path), interval=0.01)
        assert loop.run_once() == 0  # logged, not raised: the loop goes on
    finally:
        engine.dispose()
