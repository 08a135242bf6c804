"""Delivery to real peers: dcmtk's storescp as the PACS, a pynetdicom SCP answering failures."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Comprehensive3DSRStorage  # type: ignore[attr-defined]
from sqlalchemy import Engine, insert, select

from ctdx.db.models import Export, ExportState, utcnow
from ctdx.db.operations import retry_export
from ctdx.db.session import make_engine, session_scope
from ctdx.worker.report import DeliveryLoop, deliver_due, publish_reports
from ctdx.worker.report.outbox import (
    Destination,
    ExportView,
    StoredObject,
    list_exports,
    record_exports,
)
from tests.conftest import free_port, wait_for
from tests.report.conftest import (
    AnalysedStudy,
    StoreSCP,
    add_analysis,
    dsrdump,
    settings_for,
)


def exports(engine: Engine) -> list[ExportView]:
    with session_scope(engine) as s:
        return list_exports(s)


@dataclass
class AnsweringSCP:
    """A C-STORE SCP that answers ``status`` and counts the requests per SOP Instance UID."""

    status: int
    port: int = field(default_factory=free_port)
    received: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle_store(self, event: Event) -> int:
        with self.lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def count(self) -> int:
        with self.lock:
            return len(self.received)


@pytest.fixture
def answering_scp() -> Iterator[Callable[[int], AnsweringSCP]]:
    servers = []

    def start(status: int) -> AnsweringSCP:
        scp = AnsweringSCP(status)
        ae = AE(ae_title="PACS")
        ae.add_supported_context(Comprehensive3DSRStorage)
        server = ae.start_server(
            ("127.0.0.1", scp.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, scp.handle_store)],
        )
        servers.append(server)
        return scp

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.dcmtk
def test_sr_arrives_at_the_pacs_in_the_original_study(
    report_engine: Engine,
    data_dir: Path,
    analysed: AnalysedStudy,
    storescp: Callable[[], StoreSCP],
) -> None:
    pacs = storescp()
    pacs.start()
    settings = settings_for(data_dir, pacs_host="127.0.0.1", pacs_port=pacs.port)
    publish_reports(report_engine, analysed.analysis_id, settings)
    files = wait_for(pacs.files, timeout=20, message="the SR at storescp")
    assert isinstance(files, list) and len(files) == 1
    tree = dsrdump(files[0])
    assert "Imaging Measurement Report" in tree
    received = pydicom.dcmread(files[0])
    assert received.StudyInstanceUID == analysed.study_instance_uid
    [export] = exports(report_engine)
    assert (export.state, export.last_status, export.attempts) == ("delivered", 0, 1)
    assert export.sop_instance_uid == received.SOPInstanceUID
    assert export.destination == f"PACS@127.0.0.1:{pacs.port}"

    # publishing again (a redelivered task) records and sends nothing new
    publish_reports(report_engine, analysed.analysis_id, settings)
    assert [e.attempts for e in exports(report_engine)] == [1]
    assert len(pacs.files()) == 1


@pytest.mark.dcmtk
def test_pacs_down_first_then_up_receives_exactly_one_sr(
    report_engine: Engine,
    data_dir: Path,
    analysed: AnalysedStudy,
    storescp: Callable[[], StoreSCP],
) -> None:
    pacs = storescp()  # not started: nothing listens on its port
    settings = settings_for(
        data_dir, pacs_host="127.0.0.1", pacs_port=pacs.port, export_max_attempts=50
    )
    publish_reports(report_engine, analysed.analysis_id, settings)  # must not raise
    [export] = exports(report_engine)
    assert export.state == "pending" and export.attempts == 1
    assert export.last_error is not None and "association" in export.last_error

    pacs.start()
    loop = DeliveryLoop(report_engine, settings, interval=0.05)
    thread, stop = loop.start()
    try:
        wait_for(
            lambda: exports(report_engine)[0].state == "delivered",
            timeout=30,
            message="delivery once the PACS is up",
        )
        # the loop keeps running: the delivered export is never sent again
        for _ in range(3):
            assert deliver_due(report_engine, settings, now=utcnow() + timedelta(days=1)) == 0
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert pacs.sop_instance_uids() == [export.sop_instance_uid]
    assert exports(report_engine)[0].last_error is None


def test_failure_status_is_retried_then_dead_lettered(
    report_engine: Engine,
    data_dir: Path,
    analysed: AnalysedStudy,
    answering_scp: Callable[[int], AnsweringSCP],
) -> None:
    pacs = answering_scp(0xA700)  # refused: out of resources
    settings = settings_for(
        data_dir, pacs_host="127.0.0.1", pacs_port=pacs.port, export_max_attempts=3
    )
    publish_reports(report_engine, analysed.analysis_id, settings)
    [export] = exports(report_engine)
    assert (export.state, export.attempts, export.last_status) == ("pending", 1, 0xA700)
    assert export.last_attempt_at is not None  # backoff (0.05 s, +-10%) after the attempt
    assert (export.next_attempt_at - export.last_attempt_at).total_seconds() >= 0.045
    loop = DeliveryLoop(report_engine, settings, interval=0.05)
    thread, stop = loop.start()
    try:
        wait_for(lambda: exports(report_engine)[0].state == "dead", timeout=30, message="dead")
    finally:
        stop.set()
        thread.join(timeout=10)
    [export] = exports(report_engine)
    assert export.attempts == 3 and pacs.count() == 3
    assert export.last_status == 0xA700 and "out of resources" in (export.last_error or "")
    # dead letters stay dead until an operator requeues them
    assert deliver_due(report_engine, settings, now=utcnow() + timedelta(days=1)) == 0
    with session_scope(report_engine) as s:  # the operator's `ctdx exports retry --dead`
        assert len(retry_export(s, dead=True, actor="test")) == 1
    assert deliver_due(report_engine, settings) == 1
    assert pacs.count() == 4 and exports(report_engine)[0].attempts == 1


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (0x0000, "delivered"),
        (0xB000, "delivered"),
        (0xB007, "delivered"),
        (0xC000, "pending"),
        (0x0122, "pending"),
    ],
)
def test_only_success_and_storage_warnings_count_as_delivered(
    report_engine: Engine,
    data_dir: Path,
    analysed: AnalysedStudy,
    answering_scp: Callable[[int], AnsweringSCP],
    status: int,
    state: str,
) -> None:
    pacs = answering_scp(status)
    settings = settings_for(data_dir, pacs_host="127.0.0.1", pacs_port=pacs.port)
    publish_reports(report_engine, analysed.analysis_id, settings)
    [export] = exports(report_engine)
    assert (export.state, export.last_status) == (state, status)
    assert pacs.count() == 1


def test_concurrent_delivery_loops_send_each_export_once(
    db_url: str,
    tmp_path: Path,
    answering_scp: Callable[[int], AnsweringSCP],
) -> None:
    """Four loops against one database (SQLite and PostgreSQL): every export is sent once."""
    engine = make_engine(db_url)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    try:
        study = add_analysis(engine, data_dir)
        pacs = answering_scp(0x0000)
        settings = settings_for(data_dir, pacs_port=pacs.port)  # no PACS: built, not sent
        publish_reports(engine, study.analysis_id, settings)
        sr = next((data_dir / "reports").rglob("sr-*.dcm"))
        now = utcnow()
        rows = [
            {
                "analysis_id": study.analysis_id,
                "kind": "sr",
                "destination": f"PACS@127.0.0.1:{pacs.port}",
                "sop_instance_uid": f"2.25.{n}",
                "path": str(sr.relative_to(data_dir)),
                "state": ExportState.PENDING,
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": now,
            }
            for n in range(12)
        ]
        with session_scope(engine) as s:
            s.execute(insert(Export), rows)
        loops = [DeliveryLoop(engine, settings, interval=0.01) for _ in range(4)]
        started = [loop.start() for loop in loops]
        try:
            wait_for(
                lambda: all(e.state == "delivered" for e in exports(engine)),
                timeout=120,
                message="all exports delivered",
            )
        finally:
            for _thread, stop in started:
                stop.set()
            for thread, _ in started:
                thread.join(timeout=30)
        assert pacs.count() == 12  # one C-STORE per export: none sent twice
        assert {e.attempts for e in exports(engine)} == {1}
        with session_scope(engine) as s:
            assert s.scalar(select(Export.claimed_by).where(Export.claimed_by.is_not(None))) is None
    finally:
        engine.dispose()


def test_missing_file_is_a_failed_attempt_not_a_crash(
    report_engine: Engine,
    data_dir: Path,
    analysed: AnalysedStudy,
    answering_scp: Callable[[int], AnsweringSCP],
) -> None:
    pacs = answering_scp(0x0000)
    settings = settings_for(
        data_dir, pacs_host="127.0.0.1", pacs_port=pacs.port, export_max_attempts=1
    )
    [export_id] = record_exports(
        report_engine,
        analysed.analysis_id,
        [StoredObject("sr", "2.25.1", "reports/missing.dcm")],
        Destination("PACS", "127.0.0.1", pacs.port),
        utcnow(),
    )
    assert deliver_due(report_engine, settings, ids=[export_id]) == 1
    [export] = exports(report_engine)
    assert export.state == "dead" and "cannot read" in (export.last_error or "")
    assert pacs.count() == 0
