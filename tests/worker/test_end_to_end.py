"""Real CT series through the whole path: dcmtk storescu -> listener -> broker -> worker -> DB.

The listener runs in this process (``ctdx.scp.server.ScpService``, its own outbox
and completion); the worker is a real Celery worker subprocess. Checkpoints
have random weights, so the calls are not meaningful: the tests check that
every study arrives, is analysed once, and has every result field.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import Engine, func, select

from ctdx.db.models import Analysis, Export, SliceResult, StudyVersion
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings
from ctdx.scp.outbox import CelerySender
from ctdx.scp.server import ScpService
from tests.conftest import free_port, require_tool, wait_for
from tests.report.conftest import StoreSCP, dsrdump
from tests.worker.conftest import Checkpoints, WorkerProcess, analysis_settings

REAL = {"COVID-19/P001": 148, "CAP/cap001": 168, "Normal/normal001": 154}


@pytest.fixture
def listener() -> Iterator[Callable[..., ScpService]]:
    services: list[ScpService] = []

    def _start(settings: Settings, queue: str | None = None) -> ScpService:
        service = ScpService(settings, sender=CelerySender(settings, queue=queue))
        service.start()
        services.append(service)
        return service

    yield _start
    for service in services:
        service.stop()


def _settings(tmp_path: Path, url: str, checkpoints: Checkpoints, **kw: object) -> Settings:
    return analysis_settings(
        tmp_path / "data", url, checkpoints, None, host="127.0.0.1", port=free_port(),
        quiet_seconds=1.0, outbox_poll_seconds=0.2, min_free_bytes=0, batch_size=16, **kw,
    )


def _storescu(port: int, folders: list[Path]) -> None:
    subprocess.run(
        [require_tool("storescu"), "-aet", "SCANNER", "-aec", "CTDX", "-xs", "+sd",
         "127.0.0.1", str(port), *map(str, folders)],
        check=True, capture_output=True, timeout=300,
    )


def _wait_all(engine: Engine, n: int, worker: WorkerProcess, timeout: float) -> None:
    def done() -> bool:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{worker.output()}")
        with session_scope(engine) as session:
            states = list(session.scalars(select(StudyVersion.state)))
        return len(states) == n and all(s in ("analysed", "failed") for s in states)

    try:
        wait_for(done, timeout=timeout, interval=0.5, message=f"{n} studies analysed")
    except AssertionError:
        print(worker.output())
        raise


def _check_results(engine: Engine, expected_slices: set[int]) -> None:
    with session_scope(engine) as session:
        analyses = list(session.scalars(select(Analysis)))
        assert sorted(a.slices_total or 0 for a in analyses) == sorted(expected_slices)
        for a in analyses:
            assert a.state == "analysed", a.failure_reason
            assert a.attempts == 1 and a.decision in ("covid19", "other_pneumonia", "normal")
            assert a.series_selection and "kernel D40s" in a.series_selection
            assert a.slices_analysed and a.slices_analysed + (a.slices_skipped or 0) == \
                a.slices_total
            assert a.device and a.timings and a.timings["classification"] > 0
            rows = session.scalar(select(func.count()).select_from(SliceResult).where(
                SliceResult.analysis_id == a.id))
            assert rows == a.slices_total


@pytest.mark.slow
@pytest.mark.dcmtk
@pytest.mark.shared_data
def test_real_series_through_listener_and_embedded_worker(
    tmp_path: Path, shared_data: Path, sqlite_url: str, checkpoints: Checkpoints,
    listener: Callable[..., ScpService], start_worker: Callable[..., WorkerProcess],
) -> None:
    """No services: the embedded broker (files under the data dir), `ctdx worker`, SQLite."""
    settings = _settings(tmp_path, sqlite_url, checkpoints, broker_url="embedded",
                         manifestation_model=None)
    service = listener(settings)
    ctdx = str(Path(sys.executable).with_name("ctdx"))
    worker = start_worker(settings, "ctdx", "e2e", command=[ctdx, "worker"])
    _storescu(service.port, [shared_data / "covid-ct-md" / name for name in REAL])
    engine = make_engine(sqlite_url)
    try:
        _wait_all(engine, len(REAL), worker, timeout=600)
        _check_results(engine, set(REAL.values()))
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.dcmtk
@pytest.mark.shared_data
def test_real_series_through_listener_redis_and_celery_worker(
    tmp_path: Path, shared_data: Path, postgres_url: str, redis_url: str, redis_queue: str,
    checkpoints: Checkpoints, listener: Callable[..., ScpService],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Production shape: Redis, PostgreSQL, `celery -A worker.celery_app worker`, dcmtk PACS.

    The whole chain of issue 4's "done when": the real series ends as exactly one SR at the
    PACS, in the original study, and the export outbox shows it delivered.
    """
    pacs = StoreSCP(tmp_path / "pacs", free_port())
    pacs.start()
    settings = _settings(tmp_path, postgres_url, checkpoints, broker_url=f"{redis_url}/0",
                         pacs_ae_title=pacs.ae_title, pacs_host="127.0.0.1", pacs_port=pacs.port)
    service = listener(settings, queue=redis_queue)
    worker = start_worker(settings, redis_queue, "e2e-redis", pool="prefork")
    _storescu(service.port, [shared_data / "covid-ct-md" / "COVID-19" / "P001"])
    engine = make_engine(postgres_url)
    try:
        _wait_all(engine, 1, worker, timeout=300)
        _check_results(engine, {REAL["COVID-19/P001"]})
        with session_scope(engine) as session:
            counts = session.scalars(select(Analysis.manifestation_counts)).one()
        assert counts is not None and sum(counts.values()) > 0  # the biased head calls COVID-19
        # the default report outputs: the SR and the summary image
        files = wait_for(lambda: len(pacs.files()) == 2 and pacs.files(), timeout=60,
                         message="the SR and the summary image at the PACS")
        assert isinstance(files, list)
        modalities = {dcmread(f, stop_before_pixels=True).Modality: f for f in files}
        assert set(modalities) == {"SR", "OT"}
        sr_file = modalities["SR"]
        sr = dcmread(sr_file)
        study_uid = dcmread(next((shared_data / "covid-ct-md" / "COVID-19" / "P001").iterdir()),
                            stop_before_pixels=True).StudyInstanceUID
        assert sr.Modality == "SR" and sr.StudyInstanceUID == study_uid
        assert "COVID-19" in dsrdump(sr_file)  # dcmtk parses it and finds the study call

        def delivered() -> dict[str, Export] | None:
            # storescp writes the file before it answers the C-STORE; the worker records the
            # delivery after the answer, so the row may still be pending for a moment
            with session_scope(engine) as session:
                exports = {e.kind: e for e in session.scalars(select(Export))}
            return exports if {e.state for e in exports.values()} == {"delivered"} else None

        exports = wait_for(delivered, timeout=30, message="the exports recorded delivered")
        assert isinstance(exports, dict) and set(exports) == {"sr", "sc"}
        assert exports["sr"].sop_instance_uid == sr.SOPInstanceUID
    finally:
        pacs.stop()
        engine.dispose()
