"""Duplicates, late instances (version n+1) and the quiet period's respect for open associations."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pydicom
import pytest

from ctdx.db.models import VersionState
from tests.scp.conftest import (
    Running,
    associate,
    chunked_send,
    phantom,
    send_files,
    status_of,
    wait_for,
)


def _completed(scp: Running, count: int) -> bool:
    versions = scp.versions()
    return len(versions) == count and all(v.state != VersionState.RECEIVING for v in versions)


def test_identical_duplicate_is_success_and_stored_once(scp: Running, tmp_path: Path) -> None:
    study = phantom(tmp_path, n_slices=3)
    assert send_files(scp.port, study.paths) == [0x0000] * 3
    assert send_files(scp.port, study.paths[:2]) == [0x0000] * 2  # a resend
    assert len(scp.spool_files()) == 3
    assert scp.instance_count() == 3
    (version,) = scp.versions()
    assert version.instance_count == 3


def test_different_bytes_under_a_stored_uid_keep_the_first_copy(
    scp: Running, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = phantom(tmp_path, n_slices=2)
    assert send_files(scp.port, study.paths) == [0x0000] * 2
    (first,) = [p for p in scp.spool_files() if p.stem == study.sop_instance_uids[0]]
    digest = hashlib.sha256(first.read_bytes()).hexdigest()

    changed = pydicom.dcmread(study.paths[0])
    changed.WindowCenter = -500  # same SOP Instance UID, different content
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path, enforce_file_format=True)
    caplog.set_level(logging.INFO)
    with chunked_send(), associate(scp.port, [str(changed.file_meta.TransferSyntaxUID)]) as assoc:
        response = assoc.send_c_store(changed_path)
    assert status_of(response) == 0x0111
    assert "different content" in response.ErrorComment
    assert hashlib.sha256(first.read_bytes()).hexdigest() == digest  # first copy untouched
    assert len(scp.spool_files()) == 2 and scp.instance_count() == 2
    assert "refused with 0x0111" in caplog.text
    assert scp.incoming_files() == []


def test_a_resend_restores_a_stored_file_that_went_missing_or_was_damaged(
    scp: Running, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = phantom(tmp_path, n_slices=2)
    assert send_files(scp.port, study.paths) == [0x0000] * 2
    stored = {p.stem: p for p in scp.spool_files()}
    kept = {uid: path.read_bytes() for uid, path in stored.items()}
    missing, damaged = (stored[uid] for uid in study.sop_instance_uids)
    missing.unlink()
    damaged.write_bytes(kept[damaged.stem][:1000])  # cut short behind the listener's back
    answered = scp.service.listener.fast_path_answers
    caplog.set_level(logging.WARNING)
    assert send_files(scp.port, study.paths) == [0x0000] * 2
    if scp.settings.fast_receive:
        assert scp.service.listener.fast_path_answers == answered + 2
    assert {p.stem: p.read_bytes() for p in scp.spool_files()} == kept
    assert caplog.text.count("stored file missing or damaged, rewritten") == 2
    assert scp.instance_count() == 2 and scp.incoming_files() == []
    assert not [p for p in scp.spool.rglob("*.part")]


def test_a_file_left_under_the_final_name_without_its_row_is_replaced(
    scp: Running, tmp_path: Path
) -> None:
    """What a crash before the commit left under an older version: never acknowledged, so the
    instance received now takes its place."""
    study = phantom(tmp_path, n_slices=1)
    uid = study.sop_instance_uids[0]
    leftover = scp.spool / study.study_instance_uid / study.series_instance_uid / f"{uid}.dcm"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"\x00" * 4096)
    assert send_files(scp.port, study.paths) == [0x0000]
    wait_for(lambda: scp.instance_count() == 1, timeout=20, message="row")
    assert scp.spool_files() == [leftover]
    assert pydicom.dcmread(leftover) == pydicom.dcmread(study.paths[0])
    assert scp.incoming_files() == [] and not [p for p in scp.spool.rglob("*.part")]


def test_late_instances_open_the_next_version(scp: Running, tmp_path: Path) -> None:
    study = phantom(tmp_path, n_slices=4)
    assert send_files(scp.port, study.paths[:3]) == [0x0000] * 3
    wait_for(lambda: _completed(scp, 1), timeout=20, message="version 1 complete")

    # a resend of what version 1 already has changes nothing
    assert send_files(scp.port, study.paths[:1]) == [0x0000]
    assert len(scp.versions()) == 1

    assert send_files(scp.port, study.paths[3:]) == [0x0000]
    wait_for(lambda: _completed(scp, 2), timeout=20, message="version 2 complete")
    first, second = scp.versions()
    assert (first.version, first.instance_count) == (1, 3)
    assert (second.version, second.instance_count) == (2, 1)
    assert second.study_id == first.study_id
    wait_for(lambda: len(scp.sender.sent) == 2, timeout=20, message="both versions queued")
    assert scp.sender.sent == [first.id, second.id]


def test_quiet_period_waits_for_an_open_association(scp_sqlite: Running, tmp_path: Path) -> None:
    scp = scp_sqlite
    study = phantom(tmp_path, n_slices=2)
    with chunked_send(), associate(scp.port, [pydicom.uid.ExplicitVRLittleEndian]) as assoc:
        assert status_of(assoc.send_c_store(study.paths[0])) == 0x0000
        # 2 s, four times the quiet period: the association still holds the study open
        for _ in range(8):
            _pause(0.25)
            assert assoc.send_c_echo().Status == 0x0000  # the peer is alive, just slow
            assert scp.versions()[0].state == VersionState.RECEIVING
        assert status_of(assoc.send_c_store(study.paths[1])) == 0x0000
    wait_for(lambda: _completed(scp, 1), timeout=20, message="complete after release")
    assert scp.versions()[0].instance_count == 2


def _pause(seconds: float) -> None:
    """Let the listener's clock run (polled deadline) while the association stays open."""
    import time

    end = time.monotonic() + seconds
    wait_for(lambda: time.monotonic() >= end, timeout=seconds + 5, interval=0.02)
