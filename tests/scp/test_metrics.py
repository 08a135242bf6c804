"""Prometheus metrics scraped over HTTP from real processes, checked for what the test caused.

Two listener processes share the port (``CTDX_LISTENER_PROCESSES=2``, PostgreSQL)
and a prefork worker runs a pool process: the counts must add up across
processes (prometheus-client's multiprocess mode), whichever process did the work.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from ctdx.db.models import Export
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings
from ctdx.model_train.phantom import write_phantom_series
from tests.conftest import free_port, require_tool, wait_for
from tests.report.conftest import StoreSCP
from tests.worker import conftest as worker_fixtures
from tests.worker.conftest import Checkpoints, analysis_settings
from tests.worker.services import CTDX, ListenerProcess, scrape, settings_env

N_SLICES = 10

# the worker tests' small models and series rules, as fixtures here too
checkpoints = worker_fixtures.checkpoints
small_rules = worker_fixtures.small_rules


def _storescu(
    port: int, files: list[Path], calling: str = "SCANNER"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("storescu"), "-aet", calling, "-aec", "CTDX", "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )


def _not_ct(source: Path, out: Path) -> Path:
    """A CT Image Storage instance whose Modality says MR: the listener answers 0xA900."""
    ds = pydicom.dcmread(source)
    ds.Modality = "MR"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs", free_port())
    scp.start()
    yield scp
    scp.stop()


@pytest.mark.slow
@pytest.mark.dcmtk
@pytest.mark.postgres
def test_listener_and_worker_metrics_count_what_happened(
    tmp_path: Path, postgres_url: str, checkpoints: Checkpoints, small_rules: Path,
    pacs: StoreSCP,
) -> None:
    listener_port, worker_port = free_port(), free_port()
    settings: Settings = analysis_settings(
        tmp_path / "data", postgres_url, checkpoints, small_rules, broker_url="embedded",
        host="127.0.0.1", port=free_port(), quiet_seconds=4.0, outbox_poll_seconds=0.2,
        min_free_bytes=0, listener_processes=2, allowed_calling_aes=("SCANNER",),
        metrics_port=listener_port, worker_metrics_port=worker_port,
        pacs_ae_title=pacs.ae_title, pacs_host="127.0.0.1", pacs_port=pacs.port,
    )
    study = write_phantom_series(tmp_path / "study", "covid19", n_slices=N_SLICES, size=96,
                                 seed=41)
    files = sorted(study.paths)
    listener = ListenerProcess(settings, tmp_path / "scp.log")
    wait_for(lambda: "listener process 2 of 2 running" in listener.text(), timeout=90,
             message="the second listener process")
    worker_log = tmp_path / "worker.log"
    with worker_log.open("wb") as out:
        worker = subprocess.Popen(
            [CTDX, "worker", "--pool", "prefork", "--concurrency", "1"],
            env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    engine = make_engine(postgres_url)
    try:
        for path in files:  # one association per slice: the kernel spreads them
            sent = _storescu(settings.port, [path])
            assert sent.returncode == 0, sent.stderr
        refused = _storescu(settings.port, [files[0]], calling="INTRUDER")
        assert refused.returncode != 0  # association rejected: calling AE not allowed
        _storescu(settings.port, [_not_ct(files[0], tmp_path / "mr.dcm")])  # answered 0xA900

        def delivered() -> bool:
            if worker.poll() is not None:
                raise AssertionError(worker_log.read_text())
            with session_scope(engine) as session:
                states = session.scalars(select(Export.state)).all()
            return bool(states) and all(s == "delivered" for s in states)

        wait_for(delivered, timeout=240, interval=0.5, message="the reports delivered")
        with session_scope(engine) as session:
            exports = len(session.scalars(select(Export.id)).all())

        pids = set(re.findall(r"scp\.handlers (\d+): association accepted", listener.text()))
        assert len(pids) == 2, "both listener processes should have received (SO_REUSEPORT)"
        got = scrape(listener_port)
        assert got['ctdx_instances_received_total{status="0x0000"}'] == N_SLICES
        assert got['ctdx_instances_received_total{status="0xA900"}'] == 1
        sizes = sum(p.stat().st_size for p in files) + (tmp_path / "mr.dcm").stat().st_size
        assert sizes * 0.9 <= got["ctdx_received_bytes_total"] <= sizes * 1.1
        assert got['ctdx_refusals_total{reason="association calling AE title not allowed"}'] == 1
        assert got['ctdx_refusals_total{reason="c-store not_ct"}'] == 1
        assert got["ctdx_open_associations"] == 0
        assert got["ctdx_outbox_depth"] == 0 and got["ctdx_outbox_oldest_age_seconds"] == 0
        assert got["ctdx_studies_completed_total"] == 1
        assert got["ctdx_outbox_dispatched_total"] == 1
        assert got['ctdx_study_versions{state="analysed"}'] == 1
        assert got["ctdx_broker_up"] == 1 and got["ctdx_database_up"] == 1

        w = scrape(worker_port)
        assert w['ctdx_analyses_total{outcome="analysed"}'] == 1
        assert w['ctdx_stage_seconds_count{stage="classification"}'] == 1
        assert w['ctdx_stage_seconds_sum{stage="classification"}'] > 0
        assert w["ctdx_queue_wait_seconds_count"] == 1
        [model] = [k for k in w if k.startswith("ctdx_model_info{")]
        assert 'model_name="test-recognition"' in model and 'device="cpu' in model
        assert w[model] == 1
        assert w['ctdx_exports{state="delivered"}'] == exports
        assert w['ctdx_exports{state="dead"}'] == 0
        assert w["ctdx_oldest_undelivered_report_age_seconds"] == 0
    finally:
        engine.dispose()
        if worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=60)
        listener.stop()


def test_a_port_in_use_is_a_warning_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from ctdx.db import metrics

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert metrics.serve(port) is None
    assert f"metrics endpoint not started on port {port}" in caplog.text


def test_metrics_port_zero_serves_nothing(tmp_path: Path) -> None:
    from ctdx.scp import metrics as scp_metrics
    from ctdx.worker import metrics as worker_metrics

    settings = Settings(data_dir=tmp_path, metrics_port=0, worker_metrics_port=0)
    assert scp_metrics.start(settings) is None and worker_metrics.start(settings) is None


def test_dashboard_and_alert_rules_use_only_metrics_ctdx_serves() -> None:
    """deploy/grafana and deploy/prometheus name no metric that does not exist."""
    import json

    root = Path(__file__).resolve().parents[2]
    sources = "".join((root / f).read_text() for f in
                      ("scp/metrics.py", "worker/metrics.py", "db/metrics.py"))
    defined = set(re.findall(r'"(ctdx_[a-z_]+)"', sources))
    dashboard = json.loads((root / "deploy/grafana/ctdx-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = (root / "deploy/prometheus/ctdx-alerts.yml").read_text()  # (no YAML library here)
    exprs += re.findall(r"^\s+expr: (.+)$", rules, flags=re.MULTILINE)
    used = {re.sub(r"_(total|bucket|sum|count)$", "", name)
            for e in exprs for name in re.findall(r"ctdx_[a-z_]+", e)}
    assert used and used <= defined, used - defined
    scrape = (root / "deploy/prometheus/prometheus.yml").read_text()
    ports = set(re.findall(r'"[a-z0-9.-]+:(\d+)"', scrape))
    defaults = {str(Settings.model_fields[name].default)
                for name in ("metrics_port", "worker_metrics_port")}
    assert ports == defaults


_FORKS = """
import os, sys
from ctdx.db import metrics
from ctdx.scp.metrics import listener_metrics
path = metrics.prepare("listener")
print(path)
pids = []
for n in range(3):
    pid = os.fork()
    if pid == 0:  # a listener process: counts, then dies without flushing anything
        m = listener_metrics()
        m.instances.labels(status="0x0000").inc(n + 1)
        m.open_associations.inc()
        os._exit(0)
    os.waitpid(pid, 0)
    pids.append(pid)
listener_metrics().open_associations.inc()
from ctdx.scp.metrics import process_exited
process_exited(pids[0])  # what the primary does when it restarts a dead listener process
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
sys.stdout.write(generate_latest(registry).decode())
"""


def test_counts_of_forked_processes_add_up_and_stale_directories_go(tmp_path: Path) -> None:
    """Multiprocess mode in a process of its own (it changes process-wide state)."""
    import os
    import sys

    base = tmp_path / "prom"
    dead = base / "ctdx-metrics-listener-999999999"  # a dead service's directory: removed
    foreign = base / "worker-1"  # not ours: kept
    for d in (dead, foreign):
        d.mkdir(parents=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(base)}
    env.pop("CTDX_METRICS_BASE_DIR", None)
    out = subprocess.run([sys.executable, "-c", _FORKS], env=env, capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(base / f"ctdx-metrics-listener-{lines[0].rsplit('-', 1)[1]}")
    assert 'ctdx_instances_received_total{status="0x0000"} 6.0' in out.stdout  # 1 + 2 + 3
    # livesum: a process marked dead no longer counts; the others were not marked (yet)
    assert "ctdx_open_associations 3.0" in out.stdout
    assert not dead.exists() and foreign.exists()
    assert not Path(lines[0]).exists()  # removed when the service exited
