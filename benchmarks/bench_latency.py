"""From the last slice sent to the SR in the PACS: the whole product, timed stage by stage.

Starts the production shape as separate processes: dcmtk ``storescp`` as the
PACS, ``ctdx worker`` (one process, Redis broker by default) and ``ctdx scp``;
warms them up with a small phantom study (the worker loads its models once per
process); then sends each study with dcmtk ``storescu`` and waits until the
export outbox shows its SR delivered. Every time comes from the database rows
the services write (``study_versions.last_received_at`` / ``completed_at``,
``outbox.dispatched_at``, ``analyses.claimed_at`` / ``finished_at``,
``exports.delivered_at``), so the stages add up to what a radiologist waits.

Checkpoints are the benchmark's random-init ResNet50/ResNet18 at 224 px with
int8 weights (``bench_worker.make_checkpoints``): the timing does not depend on
the weights. Example:

    .venv/bin/python benchmarks/bench_latency.py --out benchmarks/results/latency.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_worker import make_checkpoints  # noqa: E402
from machine_info import cpu_name  # noqa: E402

from tests.conftest import free_port, wait_for  # noqa: E402

REAL_SERIES = REPO.parent / "shared" / "data" / "covid-ct-md" / "COVID-19" / "P001"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Services:
    """storescp (PACS), ctdx worker and ctdx scp, each a process with a log file."""

    def __init__(self, work: Path, env: dict[str, str], pacs_port: int, scp_port: int) -> None:
        self.work, self.env = work, env
        self.pacs_port, self.scp_port = pacs_port, scp_port
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _start(self, name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = (self.work / f"{name}.log").open("wb")
        env = {**self.env, **(extra_env or {})}
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=REPO)

    def alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.work / f"{name}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"{name} exited ({proc.returncode}):\n{tail}")

    def start(self) -> None:
        bindir = Path(sys.executable).parent
        pacs_dir = self.work / "pacs"
        pacs_dir.mkdir()
        self._start("storescp", [shutil.which("storescp") or "storescp", "-aet", "PACS", "-od",
                                 str(pacs_dir), "-uf", "+xa", str(self.pacs_port)],
                    {"TCP_NODELAY": "1"})
        self._start("worker", [str(bindir / "ctdx"), "worker", "--concurrency", "1"])
        self._start("scp", [str(bindir / "ctdx"), "scp", "--port", str(self.scp_port)])
        wait_for(lambda: self.alive() or (listening(self.pacs_port)
                                          and listening(self.scp_port)),
                 timeout=60, interval=0.2, message="storescp and ctdx scp listening")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def send(port: int, folder: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["storescu", "-aet", "SCANNER", "-aec", "CTDX", "-xs", "+sd", "127.0.0.1",
                    str(port), str(folder)], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "TCP_NODELAY": "1"})
    return time.perf_counter() - start


def study_uid_of(folder: Path) -> str:
    import pydicom

    first = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def delivered_times(url: str, study_uid: str) -> dict[str, Any] | None:
    """The rows of the study's first version once its SR is delivered, else None."""
    from sqlalchemy import select

    from ctdx.db.models import Analysis, Export, OutboxEntry, Study, StudyVersion
    from ctdx.db.session import make_engine, session_scope

    engine = make_engine(url)
    try:
        with session_scope(engine) as s:
            row = s.execute(
                select(StudyVersion, Analysis, Export)
                .join(Study, Study.id == StudyVersion.study_id)
                .join(Analysis, Analysis.study_version_id == StudyVersion.id)
                .join(Export, Export.analysis_id == Analysis.id)
                .where(Study.study_instance_uid == study_uid)
            ).first()
            if row is None:
                return None
            version, analysis, export = row
            if analysis.state == "failed":
                raise SystemExit(f"analysis failed: {analysis.failure_reason}")
            if export.state != "delivered":
                return None
            outbox = s.scalars(select(OutboxEntry.dispatched_at)
                               .where(OutboxEntry.study_version_id == version.id)).first()
            return {
                "last_received": version.last_received_at,
                "completed": version.completed_at,
                "queued": outbox,
                "claimed": analysis.claimed_at,
                "analysed": analysis.finished_at,
                "export_created": export.created_at,
                "delivered": export.delivered_at,
                "slices": analysis.slices_total,
                "analysed_slices": analysis.slices_analysed,
                "timings": dict(analysis.timings or {}),
                "device": analysis.device,
            }
    finally:
        engine.dispose()


def seconds(a: datetime | None, b: datetime | None) -> float:
    if a is None or b is None:
        return float("nan")
    return (b - a).total_seconds()


def measure(services: Services, url: str, name: str, folder: Path) -> dict[str, Any]:
    study_uid = study_uid_of(folder)
    sent = send(services.scp_port, folder)
    rows = wait_for(lambda: services.alive() or delivered_times(url, study_uid), timeout=900,
                    interval=0.2, message=f"the SR of {name} delivered")
    assert isinstance(rows, dict)
    rows["name"], rows["send_seconds"] = name, sent
    return rows


def render(results: list[dict[str, Any]], about: str, quiet: float, broker: str) -> str:
    lines = [
        "# From the last slice to the SR in the PACS",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_latency.py`, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {about}.",
        "",
        f"Processes: dcmtk storescp (PACS), `ctdx worker --concurrency 1` (broker {broker}, "
        f"warmed up with one small study first), `ctdx scp` (quiet period {quiet:g} s, "
        "SQLite); studies sent with dcmtk storescu. Times from the database rows the "
        "services write.",
        "",
        "| study | slices (analysed) | send | quiet period | completion -> queued | "
        "queued -> claimed | analysis | analysed -> SR delivered | **completion -> SR in "
        "PACS** |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['slices']} ({r['analysed_slices']}) | {r['send_seconds']:.1f} s "
            f"| {seconds(r['last_received'], r['completed']):.1f} s "
            f"| {seconds(r['completed'], r['queued']):.2f} s "
            f"| {seconds(r['queued'], r['claimed']):.2f} s "
            f"| {seconds(r['claimed'], r['analysed']):.1f} s "
            f"| {seconds(r['analysed'], r['delivered']):.2f} s "
            f"| **{seconds(r['completed'], r['delivered']):.1f} s** |")
    lines += ["", "Analysis stages (seconds, `analyses.timings`):", ""]
    for r in results:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items())
        lines.append(f"- {r['name']}: {stages}; device {r['device']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/14",
                        help="Celery broker for scp and worker ('embedded': no Redis)")
    parser.add_argument("--quiet-seconds", type=float, default=2.0)
    parser.add_argument("--slices", type=int, default=300, help="phantom study slices")
    parser.add_argument("--no-real", action="store_true", help="skip the real P001 series")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here")
    args = parser.parse_args()

    import torch

    from ctdx.db import migrate
    from ctdx.model_train.phantom import write_phantom_series

    if args.broker_url.startswith("redis://"):  # no stale tasks of an earlier run
        import redis

        redis.Redis.from_url(args.broker_url).flushdb()
    work = Path(tempfile.mkdtemp(prefix="ctdx-bench-latency-"))
    rec, man = make_checkpoints(work / "models")
    url = f"sqlite:///{work / 'ctdx.sqlite3'}"
    migrate.upgrade(url)
    pacs_port, scp_port = free_port(), free_port()
    threads = max(1, len(os.sched_getaffinity(0)))
    env = {**os.environ, "CTDX_DATA_DIR": str(work / "data"), "CTDX_DATABASE_URL": url,
           "CTDX_BROKER_URL": args.broker_url, "CTDX_QUIET_SECONDS": str(args.quiet_seconds),
           "CTDX_MODEL": str(rec), "CTDX_MANIFESTATION_MODEL": str(man),
           "CTDX_PACS_AE_TITLE": "PACS", "CTDX_PACS_HOST": "127.0.0.1",
           "CTDX_PACS_PORT": str(pacs_port), "CTDX_ALLOWED_CALLING_AES": "*",
           "CTDX_TORCH_THREADS": str(threads), "CTDX_MIN_FREE_BYTES": "0"}
    about = (f"{cpu_name()}, {threads} cores, "
             f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; "
             f"load average {os.getloadavg()[0]:.1f} at start")
    services = Services(work, env, pacs_port, scp_port)
    studies: list[tuple[str, Path]] = [
        (f"phantom {args.slices}x512²", write_phantom_series(
            work / "phantom", "covid19", n_slices=args.slices, size=512, seed=3).paths[0].parent),
    ]
    if REAL_SERIES.is_dir() and not args.no_real:
        studies.append(("covid-ct-md P001 (JPEG lossless)", REAL_SERIES))
    try:
        services.start()
        warm = write_phantom_series(work / "warm", "normal", n_slices=24, size=512, seed=9)
        measure(services, url, "warm-up", warm.paths[0].parent)
        results = [measure(services, url, name, folder) for name, folder in studies]
    finally:
        services.stop()
    about += f", {os.getloadavg()[0]:.1f} at the end"
    text = render(results, about, args.quiet_seconds, args.broker_url)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
