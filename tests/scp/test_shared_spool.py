"""Two `ctdx scp` on one data directory: neither touches the other's transfers in flight.

A second listener started on the same data directory by mistake (here: on the
busy port, so it fails to listen) must not delete the running listener's
temporary files during its start-up clean-up; the running listener's transfer
completes with success. The folder of a listener killed mid-transfer is
removed by the next start-up. Both receive paths: the fast path's files are
unnamed until stored, pynetdicom's are named.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import evt

from tests.conftest import free_port, wait_for
from tests.scp.conftest import associate, phantom, unnamed_files_in
from tests.scp.test_cli import CTDX, running

CT = "1.2.840.10008.5.1.4.1.1.2"


def _command(sop_instance_uid: str) -> bytes:
    uid = sop_instance_uid.encode()
    uid += b"\x00" * (len(uid) % 2)
    ct = CT.encode() + b"\x00"
    fields = [(0x0002, ct), (0x0100, struct.pack("<H", 1)), (0x0110, struct.pack("<H", 1)),
              (0x0700, struct.pack("<H", 2)), (0x0800, struct.pack("<H", 0)), (0x1000, uid)]
    body = b"".join(struct.pack("<HHL", 0, e, len(v)) + v for e, v in fields)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _pdu(context_id: int, control: int, data: bytes) -> bytes:
    item = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBL", 0x04, 0x00, len(item)) + item


def _data_set(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[144 + struct.unpack_from("<L", raw, 140)[0]:]


def _in_flight(data_dir: Path, pid: int | None = None) -> list[str]:
    """Received files in ``.incoming``: named ones, and the unnamed ones with data that the
    listener process ``pid`` holds open (the fast path's, see ``ctdx.scp.prepared``)."""
    incoming = data_dir / "spool" / ".incoming"
    found = [str(p) for p in incoming.rglob("*") if p.is_file() and p.suffix != ".lock"]
    if pid is not None:
        found += [str(p) for p in unnamed_files_in(incoming, pid)]
    return found


@pytest.mark.parametrize("receive_path", ["fast", "pynetdicom"])
def test_a_second_listener_on_the_same_data_directory_leaves_transfers_alone(
    tmp_path: Path, sqlite_url: str, receive_path: str
) -> None:
    """On the fast path the transfer's file is unnamed (nothing for anyone to delete, nothing
    left by a crash); pynetdicom's receive path names it, and the locks protect it."""
    data_dir = tmp_path / "data"
    series = phantom(tmp_path, n_slices=2, size=64)
    port = free_port()
    statuses: list[int] = []
    named = receive_path == "pynetdicom"

    def on_message(event: evt.Event) -> None:
        if event.message.command_set.CommandField == 0x8001:
            statuses.append(int(event.message.command_set.Status))

    env = {"CTDX_FAST_RECEIVE": "false"} if named else {}
    with running(data_dir, sqlite_url, port, env=env) as first:
        pid = first.process.pid
        with associate(port, [ExplicitVRLittleEndian],
                       evt_handlers=[(evt.EVT_DIMSE_RECV, on_message)]) as assoc:
            assert assoc.is_established
            cid = next(int(c.context_id or 0) for c in assoc.accepted_contexts
                       if c.abstract_syntax == CT)
            send = assoc.dul.socket.send  # type: ignore[union-attr]
            data = _data_set(series.paths[0])
            send(_pdu(cid, 0x03, _command(series.sop_instance_uids[0])))
            send(_pdu(cid, 0x00, data[:1000]))
            (partial,) = wait_for(lambda: _in_flight(data_dir, pid), timeout=20,
                                  message="a transfer in flight")  # type: ignore[misc]
            assert named == (" (deleted)" not in partial)
            # the mistake: a second listener on the same data directory (and the busy port)
            env = {**os.environ, "CTDX_DATA_DIR": str(data_dir),
                   "CTDX_DATABASE_URL": sqlite_url, "CTDX_BROKER_URL": "memory://",
                   "CTDX_HOST": "127.0.0.1", "CTDX_MIN_FREE_BYTES": "0"}
            second = subprocess.run([*CTDX, "scp", "--port", str(port)], env=env,
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stdout + second.stderr
            assert "cannot listen" in second.stdout + second.stderr
            assert partial in _in_flight(data_dir, pid), \
                "the second listener deleted a transfer in flight"
            send(_pdu(cid, 0x02, data[1000:]))
            wait_for(lambda: statuses, timeout=30, message="the response")
            assert statuses == [0x0000]
            # another transfer in flight when the first listener dies
            send(_pdu(cid, 0x03, _command(series.sop_instance_uids[1])))
            send(_pdu(cid, 0x00, _data_set(series.paths[1])[:1000]))
            wait_for(lambda: len(_in_flight(data_dir, pid)) == 1, timeout=20,
                     message="in flight")
            first.process.send_signal(signal.SIGKILL)
            first.process.wait(timeout=30)
    assert len(_in_flight(data_dir)) == (1 if named else 0)  # what the crash left
    stored = [p for p in (data_dir / "spool").rglob("*.dcm") if ".incoming" not in p.parts]
    assert [p.stem for p in stored] == [series.sop_instance_uids[0]]
    assert _data_set(stored[0]) == _data_set(series.paths[0])
    with running(data_dir, sqlite_url, free_port()) as restarted:
        # the dead listener's folder is gone; the new one has its own, empty
        assert _in_flight(data_dir) == []
        folders = [p for p in (data_dir / "spool" / ".incoming").iterdir() if p.is_dir()]
        assert len(folders) <= 1
        assert restarted.stop() == 0


_OTHER_LISTENER = """
import shutil, sys
from pathlib import Path
from ctdx.scp.spool import Spool
spool = Spool(Path(sys.argv[1]))
spool.prepare()
received = spool.incoming / "rx-acknowledged.dcm"
shutil.copyfile(sys.argv[2], received)
assert spool.mark(received, sys.argv[3])
print(received, flush=True)
sys.stdin.read()  # receiving until told to stop
"""


def test_start_up_leaves_a_live_listeners_unrecorded_instances_to_it(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Recovery records every .unindexed link only when no other listener process is
    receiving into the spool; while one is, only links old enough to belong to nobody."""
    import sys

    from ctdx.db.session import make_engine
    from ctdx.scp.recorder import reindex_unindexed
    from ctdx.scp.registry import RegistryCache
    from ctdx.scp.spool import Spool

    series = phantom(tmp_path, n_slices=1, size=32)
    uid = series.sop_instance_uids[0]
    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_LISTENER, str(tmp_path / "spool"), str(series.paths[0]),
         uid], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    engine = make_engine(sqlite_url)
    try:
        assert other.stdout is not None
        received = Path(other.stdout.readline().strip())  # acknowledged, row not yet written
        starting = Spool(tmp_path / "spool")
        assert starting.other_live_receivers() == 1
        assert reindex_unindexed(starting, engine, RegistryCache()) == 0
        assert starting.is_marked(uid)  # left to the live listener's recorder
        assert starting.clear_incoming() == 0 and received.exists()
        other.kill()  # the other listener is gone, and its lock with it
        other.wait(timeout=30)
        assert starting.other_live_receivers() == 0
        assert reindex_unindexed(starting, engine, RegistryCache()) == 1
        assert starting.clear_incoming() == 1 and not received.exists()
    finally:
        if other.poll() is None:
            other.kill()
            other.wait(timeout=30)
        engine.dispose()
