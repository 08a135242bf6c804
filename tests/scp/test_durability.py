"""What is durable when 0x0000 is sent: the file and its `.unindexed` link; the row follows.

The database row of an acknowledged instance is written by the listener's
recorder thread a few milliseconds after success. A crash in between must lose
nothing: start-up records every `.unindexed` link before the listener accepts
anything, and duplicates are still told apart afterwards.
"""

from __future__ import annotations

import hashlib
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from ctdx.db.models import Instance, StudyVersion, VersionState
from ctdx.db.session import make_engine, session_scope
from ctdx.scp.server import recover
from tests.conftest import free_port, wait_for
from tests.scp.conftest import (
    Running,
    associate,
    chunked_send,
    phantom,
    send_files,
    status_of,
    transfer_syntax_of,
    version_states,
)
from tests.scp.test_cli import running


def _unindexed(spool: Path) -> list[str]:
    directory = spool / ".unindexed"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def _rows(engine: object) -> dict[str, Instance]:
    with session_scope(engine) as s:  # type: ignore[arg-type]
        return {i.sop_instance_uid: i for i in s.scalars(select(Instance))}


def test_success_before_the_row_survives_a_crash_and_duplicates_stay_exact(
    start_scp: Callable[..., Running], tmp_path: Path
) -> None:
    scp = start_scp(quiet_seconds=60)
    study = phantom(tmp_path, n_slices=4)
    scp.service.listener.store.recorder.pause(True)  # rows held back, as if about to crash
    with chunked_send(), associate(scp.port, [transfer_syntax_of(study.paths[0])]) as assoc:
        statuses = [status_of(assoc.send_c_store(p)) for p in study.paths]
    assert statuses == [0x0000] * 4
    # what is on stable storage when success is sent: the files and their links, no rows
    assert scp.instance_count() == 0
    assert _unindexed(scp.spool) == sorted(study.sop_instance_uids)
    for source in study.paths:
        (stored,) = [p for p in scp.spool_files() if p.stem == source.stem]
        marker = scp.spool / ".unindexed" / source.stem
        assert stored.samefile(marker)
        assert pydicom.dcmread(stored).SOPInstanceUID == source.stem
    scp.service.stop()  # the paused recorder writes nothing on the way down: a crash

    recover(scp.settings, scp.engine)  # what the next start-up does before listening
    rows = _rows(scp.engine)
    assert set(rows) == set(study.sop_instance_uids)
    assert _unindexed(scp.spool) == []
    for row in rows.values():
        stored = scp.spool / row.path
        assert row.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert row.size_bytes == stored.stat().st_size
    (version,) = scp.versions()
    assert version.instance_count == 4 and version.state == VersionState.RECEIVING

    # restarted: a resend is an identical duplicate, different bytes keep the first copy
    again = start_scp(quiet_seconds=0.5)  # same data dir and database
    assert send_files(again.port, study.paths) == [0x0000] * 4
    changed = pydicom.dcmread(study.paths[0])
    changed.WindowCenter = -500
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path, enforce_file_format=True)
    assert send_files(again.port, [changed_path]) == [0x0111]
    assert again.instance_count() == 4 and len(again.spool_files()) == 4
    wait_for(lambda: again.versions()[0].state == VersionState.QUEUED, timeout=20,
             message="study complete and queued")
    assert again.versions()[0].instance_count == 4


def test_release_is_answered_after_the_rows_are_written(
    scp: Running, tmp_path: Path
) -> None:
    study = phantom(tmp_path, n_slices=6)
    assert send_files(scp.port, study.paths) == [0x0000] * 6
    # send_files has released its association: every row is there, every link gone
    assert scp.instance_count() == 6
    assert _unindexed(scp.spool) == []


def test_a_resend_while_the_first_copy_is_still_being_recorded_waits_for_its_row(
    scp_sqlite: Running, tmp_path: Path
) -> None:
    study = phantom(tmp_path, n_slices=1)
    recorder = scp_sqlite.service.listener.store.recorder
    recorder.pause(True)
    with chunked_send(), associate(scp_sqlite.port, [transfer_syntax_of(study.paths[0])]) as first:
        assert status_of(first.send_c_store(study.paths[0])) == 0x0000
        assert scp_sqlite.instance_count() == 0  # claimed, not yet recorded
        statuses: list[int] = []
        resend = threading.Thread(
            target=lambda: statuses.extend(send_files(scp_sqlite.port, study.paths))
        )
        resend.start()  # finds the claim and waits for the row (or, if late, the row)
        recorder.pause(False)
        resend.join(timeout=30)
    assert statuses == [0x0000]
    assert scp_sqlite.instance_count() == 1 and len(scp_sqlite.spool_files()) == 1
    assert _unindexed(scp_sqlite.spool) == []


@pytest.mark.slow
def test_kill_9_right_after_success_loses_nothing(tmp_path: Path, db_url: str) -> None:
    data_dir = tmp_path / "data"
    study = phantom(tmp_path, n_slices=12)
    port = free_port()
    with running(data_dir, db_url, port, "--quiet-seconds", "60") as first:
        with chunked_send(), associate(port, [transfer_syntax_of(study.paths[0])]) as assoc:
            for path in study.paths:
                assert status_of(assoc.send_c_store(path)) == 0x0000
            first.process.send_signal(signal.SIGKILL)  # no release: rows may be unwritten
            first.process.wait(timeout=30)
    engine = make_engine(db_url)
    try:
        spool = data_dir / "spool"
        left = _unindexed(spool)
        assert set(left) <= set(study.sop_instance_uids)
        assert set(left) | set(_rows(engine)) == set(study.sop_instance_uids)
        with running(data_dir, db_url, free_port(), "--quiet-seconds", "1") as second:
            # recovered before listening: every acknowledged instance has its row
            rows = _rows(engine)
            assert set(rows) == set(study.sop_instance_uids)
            assert _unindexed(spool) == []
            assert all((spool / r.path).is_file() for r in rows.values())
            assert send_files(second.port, study.paths) == [0x0000] * 12  # the resend
            wait_for(lambda: version_states(engine) == [VersionState.QUEUED], timeout=30,
                     message="study complete and queued")
        with session_scope(engine) as s:
            assert s.scalars(select(StudyVersion)).one().instance_count == 12
    finally:
        engine.dispose()


