"""Receive throughput of `ctdx scp` against dcmtk's storescp, same study, same run, interleaved.

Sends a synthetic CT study (default 300 slices of 512x512, uncompressed) with
dcmtk ``storescu`` to each receiver in turn, round after round, with one sender
and with four concurrent senders (each its own copy of the study, new UIDs):

- ``storescp`` default (``TCP_NODELAY=1`` in its environment: Debian's dcmtk
  otherwise waits on delayed ACKs and caps near 22 instances/s);
- ``storescp +B`` (bit-preserving writes, its fastest mode);
- ``ctdx scp`` with one listener process, and with four senders also with two
  (``--processes 2``), on a fresh data dir and SQLite database each run
  (``--database-url`` to use PostgreSQL: give an admin URL, a database is
  created per run);
- ``ctdx scp`` with its fast receive path off (``CTDX_FAST_RECEIVE=false``:
  every PDU through pynetdicom), the before/after of ``scp/fastpath.py``;
- for reference, a plain pynetdicom storage SCP on the same contexts and PDU
  size whose handler only renames pynetdicom's received file into a folder
  (no checks, no fsync, no database): the floor pynetdicom itself sets;
- Orthanc (Debian's build, ``SyncStorageArea`` true, its default: every file fsynced
  before the answer, index in its own SQLite), the durable peer: a generated
  configuration in the run's folder, its own DICOM and HTTP ports, no plugins;
- for reference, the *durable write floor*: no network and no DICOM, one
  thread per sender writing its study's files from memory exactly as durably as
  the listener must before it answers (write, fsync, two links, fsync of both
  directories). storescp does not fsync; this row shows what that is worth.

Reports slices/s (all slices / wall time from the first sender's start to the
last one's exit), the ratio to storescp default, and the receiver's peak
resident memory (the process tree, sampled every 50 ms). Every ctdx run is
checked: all instances stored. Example:

    .venv/bin/python benchmarks/bench_scp.py --rounds 3 --out benchmarks/results/scp.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ctdx-bench-scp")
    parser.add_argument("--database-url", default=None,
                        help="PostgreSQL admin URL (a database per run); default SQLite")
    parser.add_argument("--machine", default="2-core dev VM")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--only", nargs="+", default=None, metavar="RECEIVER",
                        help="run only receivers whose name starts with one of these "
                        "(e.g. 'storescp default' 'ctdx scp'); for quick comparisons")
    return parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def echo_ok(port: int) -> bool:
    return subprocess.run(["echoscu", "-aec", "ANY", "127.0.0.1", str(port)],
                          capture_output=True).returncode == 0


# --- studies ---------------------------------------------------------------------------------

def prepare_studies(work: Path, slices: int, size: int, count: int) -> list[Path]:
    """Study 0 is rendered once (cached); the others are copies with new UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    from ctdx.model_train.phantom import write_phantom_series

    base = work / f"study-{slices}x{size}"
    studies = [base / f"s{i}" for i in range(count)]
    done = [study.with_name(f"{study.name}.done") for study in studies]  # not in the study dir
    if not done[0].exists():
        shutil.rmtree(studies[0], ignore_errors=True)
        print(f"rendering a {slices}-slice {size}x{size} phantom study ...", flush=True)
        write_phantom_series(studies[0], "covid19", n_slices=slices, size=size, seed=11)
        done[0].touch()
    for study, marker in zip(studies[1:], done[1:], strict=True):
        if marker.exists():
            continue
        shutil.rmtree(study, ignore_errors=True)
        study.mkdir(parents=True)
        study_uid, series_uid = generate_uid(), generate_uid()
        for path in sorted(studies[0].glob("*.dcm")):
            ds = pydicom.dcmread(path)
            sop = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.save_as(study / f"{sop}.dcm", enforce_file_format=True)
        marker.touch()
    return studies


# --- receivers -------------------------------------------------------------------------------

@dataclass
class Receiver:
    name: str
    start: Callable[[Path, int], subprocess.Popen[bytes]]
    check: Callable[[Path, int], None] = lambda run_dir, expected: None
    check_while_running: bool = False  # Orthanc answers through its REST API


def storescp(bit_preserving: bool) -> Callable[[Path, int], subprocess.Popen[bytes]]:
    def start(run_dir: Path, port: int) -> subprocess.Popen[bytes]:
        out = run_dir / "out"
        out.mkdir()
        args = ["storescp", *(["+B"] if bit_preserving else []), "-od", str(out), str(port)]
        env = {**os.environ, "TCP_NODELAY": "1"}
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return start


_REFERENCE = """
import os, sys
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage, Verification
from ctdx.db.logs import silence_identifier_logging
silence_identifier_logging()
_config.STORE_RECV_CHUNKED_DATASET = True
out, port = sys.argv[1], int(sys.argv[2])
def store(event):
    os.replace(event.dataset_path, os.path.join(out, event.request.AffectedSOPInstanceUID))
    return 0
ae = AE("REFERENCE")
ae.maximum_pdu_size = 262144
ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
ae.add_supported_context(Verification)
ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, store)])
"""


def pynetdicom_reference(run_dir: Path, port: int) -> subprocess.Popen[bytes]:
    out = run_dir / "out"
    out.mkdir()
    return subprocess.Popen([sys.executable, "-c", _REFERENCE, str(out), str(port)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def orthanc() -> tuple[Starter, Callable[[Path, int], None]]:
    """Debian's ``Orthanc`` with a generated configuration; checked through its REST API."""
    http_ports: dict[Path, int] = {}

    def start(run_dir: Path, port: int) -> subprocess.Popen[bytes]:
        http_ports[run_dir] = http_port = free_port()
        config = {
            "Name": "ctdx-bench", "StorageDirectory": str(run_dir / "storage"),
            "IndexDirectory": str(run_dir / "index"), "DicomAet": "CTDX", "DicomPort": port,
            "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True, "StorageCompression": False,
            "SyncStorageArea": True, "Plugins": [],
        }
        path = run_dir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        log = (run_dir / "orthanc.log").open("wb")
        return subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=subprocess.STDOUT)

    def check(run_dir: Path, expected: int) -> None:
        url = f"http://127.0.0.1:{http_ports.pop(run_dir)}/statistics"
        stored = int(json.load(urllib.request.urlopen(url, timeout=30))["CountInstances"])
        if stored != expected:
            raise RuntimeError(f"Orthanc stored {stored} of {expected} instances")

    return start, check


ORTHANC = "Orthanc (SyncStorageArea, durable)"


def ctdx_bin() -> list[str]:
    return [sys.executable, "-c", "from ctdx.cli import main; main()"]


Starter = Callable[[Path, int], "subprocess.Popen[bytes]"]


def ctdx(processes: int, admin_url: str | None,
         fast_receive: bool = True) -> tuple[Starter, Callable[[Path, int], None]]:
    urls: dict[Path, str] = {}

    def start(run_dir: Path, port: int) -> subprocess.Popen[bytes]:
        data = run_dir / "data"
        env = {**os.environ, "CTDX_DATA_DIR": str(data), "CTDX_BROKER_URL": "memory://",
               "CTDX_MIN_FREE_BYTES": "0", "CTDX_HOST": "127.0.0.1",
               "CTDX_FAST_RECEIVE": "true" if fast_receive else "false"}
        if admin_url:
            url = create_database(admin_url)
            env["CTDX_DATABASE_URL"] = url
            urls[run_dir] = url
        subprocess.run([*ctdx_bin(), "db", "upgrade"], env=env, check=True, capture_output=True)
        log = (run_dir / "ctdx.log").open("wb")
        return subprocess.Popen(
            [*ctdx_bin(), "scp", "--port", str(port), "--processes", str(processes),
             "--log-level", "WARNING", "--max-associations", "16"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )

    def check(run_dir: Path, expected: int) -> None:
        stored = [p for p in (run_dir / "data" / "spool").rglob("*.dcm")
                  if ".incoming" not in p.parts]
        if len(stored) != expected:
            raise RuntimeError(f"ctdx stored {len(stored)} of {expected} instances "
                               f"(log: {run_dir / 'ctdx.log'})")
        if run_dir in urls and admin_url:
            drop_database(admin_url, urls.pop(run_dir))

    return start, check


def create_database(admin_url: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"ctdx_bench_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    engine.dispose()


# --- one run ---------------------------------------------------------------------------------

def tree_rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (kB)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{current}/task/{current}/children") as fh:
                pending.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


@dataclass
class Run:
    receiver: str
    senders: int
    slices_per_second: float
    peak_rss_mb: float


def run_once(receiver: Receiver, studies: list[Path], slices: int, work: Path) -> Run:
    run_dir = work / "runs" / f"{receiver.name.replace(' ', '_')}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir(parents=True)
    port = free_port()
    server = receiver.start(run_dir, port)
    try:
        wait_until(lambda: echo_ok(port) or server.poll() is not None, 120, f"{receiver.name}")
        if server.poll() is not None:
            raise RuntimeError(f"{receiver.name} exited with {server.returncode}")
        peak = [tree_rss_kb(server.pid)]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.05):
                peak[0] = max(peak[0], tree_rss_kb(server.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        env = {**os.environ, "TCP_NODELAY": "1"}
        started = time.perf_counter()
        senders = [
            subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", "CTDX", "+sd", "127.0.0.1",
                              str(port), str(study)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for study in studies
        ]
        failures = [s.communicate(timeout=1800)[1] for s in senders]
        elapsed = time.perf_counter() - started
        sampling.set()
        sampler.join()
        for sender, err in zip(senders, failures, strict=True):
            if sender.returncode != 0:
                raise RuntimeError(f"storescu to {receiver.name} failed: {err.decode()[-500:]}")
        if receiver.check_while_running:
            receiver.check(run_dir, slices * len(studies))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if not receiver.check_while_running:
        receiver.check(run_dir, slices * len(studies))
    shutil.rmtree(run_dir, ignore_errors=True)
    return Run(receiver.name, len(studies), slices * len(studies) / elapsed, peak[0] / 1024)


def durable_floor(studies: list[Path], slices: int, work: Path) -> Run:
    """What durability alone costs, without any network or DICOM: one thread per sender
    writes its study's files as the listener must before success (temporary file, write,
    fsync, two hard links, fsync of both directories), from memory. No receiver that fsyncs
    each instance before answering can be faster than this on the same disk."""
    run_dir = work / "runs" / f"floor-{uuid.uuid4().hex[:6]}"
    contents = [[p.read_bytes() for p in sorted(study.glob("*.dcm"))] for study in studies]

    def write_all(index: int, files: list[bytes]) -> None:
        incoming, final, claims = (run_dir / str(index) / name for name in ("in", "out", "claim"))
        for folder in (incoming, final, claims):
            folder.mkdir(parents=True)
        for number, data in enumerate(files):
            temporary = incoming / f"{number}.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.link(temporary, claims / str(number))
                os.link(temporary, final / f"{number}.dcm")
                os.fsync(fd)
            finally:
                os.close(fd)
            for folder in (final, claims):
                directory = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
            os.unlink(temporary)

    threads = [threading.Thread(target=write_all, args=(i, files))
               for i, files in enumerate(contents)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    shutil.rmtree(run_dir, ignore_errors=True)
    return Run(FLOOR, len(studies), slices * len(studies) / elapsed, 0.0)


FLOOR = "durable write floor (no network, reference)"
PLAIN = "ctdx scp, pynetdicom receive (CTDX_FAST_RECEIVE=false)"


# --- report ----------------------------------------------------------------------------------

@dataclass
class Table:
    runs: list[Run] = field(default_factory=list)

    def cell(self, receiver: str, senders: int) -> list[Run]:
        return [r for r in self.runs if r.receiver == receiver and r.senders == senders]

    def markdown(self, args: argparse.Namespace, load: tuple[str, str], command: str) -> str:
        lines = [
            "# `ctdx scp` receive throughput",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on a {args.machine} "
            f"({os.cpu_count()} CPUs), CPU only. Study: {args.slices} slices of "
            f"{args.size}x{args.size} (uncompressed, ~{args.size * args.size * 2 // 1000} kB "
            "each), "
            f"sent by dcmtk `storescu` over loopback; {args.rounds} rounds, receivers "
            "interleaved within each round. Database: "
            f"{'PostgreSQL' if args.database_url else 'SQLite (WAL, synchronous=FULL)'}.",
            "",
            f"Load average before / after: {load[0]} / {load[1]}. The machine is shared with "
            "other engineers' test runs, so numbers are noisy: compare receivers within this "
            "table (same rounds), not with other runs.",
            "",
            "| senders | receiver | slices/s (median) | min-max | ratio to storescp default "
            "| peak RSS (MB) |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for senders in args.senders:
            baseline = self.cell("storescp default", senders)
            base = statistics.median(r.slices_per_second for r in baseline) if baseline else None
            for receiver in dict.fromkeys(r.receiver for r in self.runs if r.senders == senders):
                cell = self.cell(receiver, senders)
                rates = [r.slices_per_second for r in cell]
                median = statistics.median(rates)
                ratio = f"{median / base:.2f}x" if base else "-"
                lines.append(
                    f"| {senders} | {receiver} | {median:.0f} | {min(rates):.0f}-{max(rates):.0f} "
                    f"| {ratio} | {max(r.peak_rss_mb for r in cell):.0f} |"
                )
        lines += ["", "Every round, slices/s:", ""]
        for senders in args.senders:
            for receiver in dict.fromkeys(r.receiver for r in self.runs if r.senders == senders):
                cell = self.cell(receiver, senders)
                listed = ", ".join(f"{r.slices_per_second:.0f}" for r in cell)
                lines.append(f"- {senders} sender(s), {receiver}: {listed}")
        lines += ["", f"Command: `{command}`", ""]
        return "\n".join(lines)


def main(args: argparse.Namespace) -> Table:
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian package dcmtk)")
    args.work.mkdir(parents=True, exist_ok=True)
    studies = prepare_studies(args.work, args.slices, args.size, max(args.senders))
    one_process, one_check = ctdx(1, args.database_url)
    two_process, two_check = ctdx(2, args.database_url)
    plain_receive, plain_check = ctdx(1, args.database_url, fast_receive=False)
    orthanc_start, orthanc_check = orthanc()
    receivers = {
        "storescp default": Receiver("storescp default", storescp(False)),
        "storescp +B": Receiver("storescp +B", storescp(True)),
        "ctdx scp": Receiver("ctdx scp", one_process, one_check),
        PLAIN: Receiver(PLAIN, plain_receive, plain_check),
        "ctdx scp --processes 2": Receiver("ctdx scp --processes 2", two_process, two_check),
        "pynetdicom no-op (reference)": Receiver("pynetdicom no-op (reference)",
                                                 pynetdicom_reference),
        ORTHANC: Receiver(ORTHANC, orthanc_start, orthanc_check, check_while_running=True),
    }
    table = Table()
    for round_number in range(1, args.rounds + 1):
        for senders in args.senders:
            names = ["storescp default", "storescp +B", "ctdx scp", PLAIN]
            if shutil.which("Orthanc") is not None:
                names.append(ORTHANC)
            if senders > 1:
                names.append("ctdx scp --processes 2")
            names += ["pynetdicom no-op (reference)", FLOOR]
            if args.only:
                names = [n for n in names if any(n.startswith(o) for o in args.only)]
            for name in names:
                if name == FLOOR:
                    run = durable_floor(studies[:senders], args.slices, args.work)
                else:
                    run = run_once(receivers[name], studies[:senders], args.slices, args.work)
                table.runs.append(run)
                print(f"round {round_number} senders {senders} {name}: "
                      f"{run.slices_per_second:.0f} slices/s, peak RSS {run.peak_rss_mb:.0f} MB",
                      flush=True)
    return table


if __name__ == "__main__":
    arguments = get_args_parser().parse_args()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    result = main(arguments)
    load_after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    text = result.markdown(arguments, (load_before, load_after), " ".join(["python", *sys.argv]))
    print(text)
    if arguments.out:
        arguments.out.parent.mkdir(parents=True, exist_ok=True)
        arguments.out.write_text(text)
