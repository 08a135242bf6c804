"""Listener memory while hostile peers declare 4 GiB PDUs, alone and while four senders stream.

Starts ``ctdx scp`` (SQLite, default settings), then keeps ``--hostile``
connections in flight, each from its own loopback address (127.0.0.2, 127.0.0.3,
...): each sends an A-ASSOCIATE-RQ header declaring 0xFFFFFFFF bytes followed by a
real request (the issue's attack), reads the answer and reconnects. Phase 1: the
hostile peers alone for ``--seconds``; phase 2: the same while ``--senders`` dcmtk
``storescu`` send their own study. The listener's resident memory is sampled every
50 ms. Reports idle / peak RSS per phase, how the hostile connections were answered,
the senders' slices/s and that every instance was stored. Example:

    .venv/bin/python benchmarks/bench_hostile.py --slices 300 --senders 4
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scp import ctdx_bin, echo_ok, free_port, prepare_studies, tree_rss_kb, wait_until  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hostile", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "ctdx-bench-scp")
    return parser


def associate_rq() -> bytes:
    """A plain A-ASSOCIATE-RQ (Verification, implicit VR) as PS3.8 9.3.2 lays it out."""
    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value

    context = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1")
                   + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">L", 16384)))
    body = struct.pack(">HH", 1, 0) + b"CTDX".ljust(16) + b"HOSTILE".ljust(16) + bytes(32) \
        + item(0x10, b"1.2.840.10008.3.1.1.1") + context + user
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def hostile_peer(port: int, source: str, stop: threading.Event, answers: Counter[str]) -> None:
    """Connect, declare 4 GiB, read what comes back, repeat until ``stop``."""
    request = associate_rq()
    attack = struct.pack(">BBL", 0x01, 0, 0xFFFF_FFFF) + request[6:]
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10,
                                          source_address=(source, 0)) as sock:
                sock.sendall(attack)
                head = sock.recv(6)
                answers[f"PDU 0x{head[0]:02X}" if head else "closed without answer"] += 1
        except OSError as exc:
            answers[type(exc).__name__] += 1


def main(args: argparse.Namespace) -> None:
    studies = prepare_studies(args.work, args.slices, args.size, args.senders)
    run_dir = Path(tempfile.mkdtemp(prefix="hostile-", dir=args.work))
    port = free_port()
    env = {**os.environ, "CTDX_DATA_DIR": str(run_dir / "data"), "CTDX_BROKER_URL": "memory://",
           "CTDX_MIN_FREE_BYTES": "0", "CTDX_HOST": "127.0.0.1"}
    subprocess.run([*ctdx_bin(), "db", "upgrade"], env=env, check=True, capture_output=True)
    with (run_dir / "ctdx.log").open("wb") as log:
        server = subprocess.Popen([*ctdx_bin(), "scp", "--port", str(port), "--log-level",
                                   "ERROR"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: echo_ok(port), 120, "ctdx scp")
        idle = tree_rss_kb(server.pid) / 1024
        peak = [idle]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.05):
                peak[0] = max(peak[0], tree_rss_kb(server.pid) / 1024)

        threading.Thread(target=sample, daemon=True).start()
        answers: Counter[str] = Counter()
        stop = threading.Event()
        peers = [threading.Thread(target=hostile_peer,
                                  args=(port, f"127.0.0.{2 + i}", stop, answers), daemon=True)
                 for i in range(args.hostile)]
        for peer in peers:
            peer.start()
        time.sleep(args.seconds)  # phase 1: the hostile peers alone, for a fixed time
        alone = peak[0]
        started = time.perf_counter()
        senders = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", "CTDX", "+sd",
                                     "127.0.0.1", str(port), str(study)],
                                    env={**os.environ, "TCP_NODELAY": "1"},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for study in studies]
        failures = [s.communicate(timeout=1800)[1] for s in senders]
        elapsed = time.perf_counter() - started
        stop.set()
        for peer in peers:
            peer.join(timeout=30)
        sampling.set()
        streaming = peak[0]
        for sender, err in zip(senders, failures, strict=True):
            if sender.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
        stored = [p for p in (run_dir / "data" / "spool").rglob("*.dcm")
                  if ".incoming" not in p.parts]
        expected = args.slices * args.senders
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(f"idle RSS {idle:.0f} MB; {args.hostile} hostile peers alone for "
              f"{args.seconds:.0f} s: peak {alone:.0f} MB; with {args.senders} senders "
              f"streaming: peak {streaming:.0f} MB")
        print(f"hostile connections: {sum(answers.values())} ({dict(answers)})")
        print(f"senders: {expected / elapsed:.0f} slices/s, {len(stored)} of {expected} stored")
        if len(stored) != expected:
            raise SystemExit("instances missing")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
