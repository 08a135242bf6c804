"""The listener's small parts on their own: UIDs, the header walker, the spool, leases."""

from __future__ import annotations

import errno
import hashlib
import os
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from sqlalchemy import select

from ctdx.db.models import ReceivingLease, Study, StudyVersion, utcnow
from ctdx.db.session import make_engine, session_scope
from ctdx.scp.completion import complete_quiet, drop_dead_leases
from ctdx.scp.header_scan import HeaderError, scan_header
from ctdx.scp.instance import read_instance_header
from ctdx.scp.spool import Sealed, Spool
from ctdx.scp.status import Rejected, Status
from ctdx.scp.uids import InvalidUid, validate_uid
from tests.scp.conftest import phantom


@pytest.mark.parametrize("value", ["1.2.840.10008.5.1.4.1.1.2", "0.1", "1.2.040\x00", "2.25.1 "])
def test_valid_uids(value: str) -> None:
    assert validate_uid(value, "SOPInstanceUID") == value.rstrip("\x00 ")


@pytest.mark.parametrize(
    "value", ["", "1.2/3", "../1.2", "1..2", ".1.2", "1.2.", "1.2.a", "1" * 65, "1.2 3"]
)
def test_invalid_uids_never_become_paths(value: str) -> None:
    with pytest.raises(InvalidUid) as caught:
        validate_uid(value, "SeriesInstanceUID")
    assert str(caught.value).startswith("SeriesInstanceUID ")
    assert value not in str(caught.value) or value == ""  # the value is never echoed


def _file_with_sequences(syntax: str) -> bytes:
    inner = Dataset()
    inner.CodeValue = "T-D3000"
    inner.CodeMeaning = "Chest"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.AnatomicRegionSequence = Sequence([inner])
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.ReferencedImageSequence = Sequence([item, item])
    ds.StudyInstanceUID = "1.2.3"
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 8
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = BytesIO()
    # undefined lengths everywhere: the walker must skip nested sequences and items
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_header_walker_skips_nested_sequences(syntax: str) -> None:
    data = _file_with_sequences(syntax)
    header = scan_header(BytesIO(data), syntax == ImplicitVRLittleEndian,
                         frozenset({0x0020000D, 0x00280010}))
    assert header.values[0x0020000D].rstrip(b"\x00") == b"1.2.3"
    assert header.values[0x00280010] == b"\x02\x00"
    assert header.pixel_data_offset is not None
    assert data[header.pixel_data_offset:header.pixel_data_offset + 4] == b"\xe0\x7f\x10\x00"
    inside_sequence = data.index(b"\x08\x00\x40\x11") + 20  # (0008,1140), then cut
    with pytest.raises(HeaderError):
        scan_header(BytesIO(data[:inside_sequence]), syntax == ImplicitVRLittleEndian,
                    frozenset())


def test_compressed_pixel_data_needs_a_fragment_per_frame(tmp_path: Path) -> None:
    study = phantom(tmp_path, n_slices=1, transfer_syntax_uid=RLELossless)
    path = study.paths[0]
    ds = pydicom.dcmread(path)
    header = read_instance_header(path, RLELossless, ds.SOPClassUID, ds.SOPInstanceUID)
    assert header.transfer_syntax_uid == RLELossless
    ds.NumberOfFrames = 2  # one fragment cannot hold two frames
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(Rejected) as caught:
        read_instance_header(path, RLELossless, ds.SOPClassUID, ds.SOPInstanceUID)
    assert caught.value.status == Status.PIXEL_DATA_INCONSISTENT
    assert "1 fragments for 2 frames" in caught.value.reason


def test_an_acknowledged_copy_that_lost_a_duplicate_race_is_kept_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    received = spool.incoming / "x"
    received.write_bytes(b"second copy, acknowledged")
    relative = "1.2/3.4/5.6.dcm"
    assert spool.link_new(received, relative) and spool.mark(received, "5.6")
    kept = spool.keep_conflict("5.6", relative, "ab" * 32)
    assert kept == spool.root / ".conflicts" / f"5.6.{'ab' * 8}.dcm"
    assert kept.read_bytes() == b"second copy, acknowledged"
    assert not spool.path_of(relative).exists()  # the first copy's name is free for it
    # a final name that is another file (the winner's) is never touched
    other = spool.incoming / "y"
    other.write_bytes(b"winner")
    spool.place(other, relative)
    assert spool.keep_conflict("5.6", relative, "cd" * 32) is None
    assert spool.path_of(relative).read_bytes() == b"winner"


def test_spool_links_without_replacing_and_undoes_only_its_own(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    first = spool.incoming / "a"
    first.write_bytes(b"first")
    second = spool.incoming / "b"
    second.write_bytes(b"second")
    assert spool.link_new(first, "1.2/3.4/5.6.dcm") is True
    assert spool.link_new(second, "1.2/3.4/5.6.dcm") is False
    spool.remove_if_same(second, "1.2/3.4/5.6.dcm")  # not ours: kept
    assert spool.path_of("1.2/3.4/5.6.dcm").read_bytes() == b"first"
    spool.place(second, "1.2/3.4/5.6.dcm")
    assert spool.path_of("1.2/3.4/5.6.dcm").read_bytes() == b"second"
    assert spool.seal(spool.path_of("1.2/3.4/5.6.dcm")).size_bytes == 6
    old = spool.incoming / "rx-old"
    old.write_bytes(b"x")
    os.utime(old, (0, 0))
    assert spool.clear_incoming(older_than_seconds=3600) == 1  # only the stale one
    assert not old.exists() and first.exists()
    assert spool.clear_incoming() == 0  # start-up: a live process's files are never touched
    assert first.exists()
    legacy = spool.incoming_root / "rx-legacy.dcm"  # an older version's layout
    legacy.write_bytes(b"x")
    assert spool.clear_incoming() == 1 and not legacy.exists() and first.exists()
    assert spool.path_of("1.2/3.4/5.6.dcm").exists()  # stored instances are not touched


def test_leases_hold_completion_and_dead_holders_are_dropped(db_url: str) -> None:
    engine = make_engine(db_url)
    now = utcnow()
    long_ago = now - timedelta(seconds=60)
    try:
        with session_scope(engine) as s:
            study = Study(study_instance_uid="1.2.3")
            s.add(study)
            s.flush()
            version = StudyVersion(study_id=study.id, version=1, first_received_at=long_ago,
                                   last_received_at=long_ago)
            s.add(version)
            s.flush()
            host = "testhost"
            s.add_all([
                ReceivingLease(study_version_id=version.id, holder=f"{host}:999999:1",
                               expires_at=now + timedelta(seconds=30)),
                ReceivingLease(study_version_id=version.id, holder=f"{host}:{os.getppid()}:1",
                               expires_at=now + timedelta(seconds=30)),
                ReceivingLease(study_version_id=version.id, holder="otherhost:1:1",
                               expires_at=now + timedelta(seconds=30)),
            ])
            version_id = version.id
        with session_scope(engine) as s:
            assert complete_quiet(s, version_id, now, 1.0) is False  # live leases
        with session_scope(engine) as s:
            assert drop_dead_leases(s, hostname="testhost") == 1
        with session_scope(engine) as s:
            holders = sorted(s.scalars(select(ReceivingLease.holder)))
        assert holders == sorted([f"testhost:{os.getppid()}:1", "otherhost:1:1"])
        with session_scope(engine) as s:  # an expired lease no longer holds the study
            assert complete_quiet(s, version_id, now + timedelta(seconds=31), 1.0) is True
    finally:
        engine.dispose()


def test_seal_new_fsyncs_the_file_and_both_directories_and_hashes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Success follows only when the file, its final directory and ``.unindexed`` are all
    fsynced: the three run at once (and the hash beside them), none may be skipped."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    received = spool.incoming / "rx-new"
    payload = os.urandom(300_000)
    received.write_bytes(payload)
    assert spool.mark(received, "5.6") and spool.link_new(received, "1.2/3.4/5.6.dcm")
    synced: list[tuple[int, int]] = []  # (device, inode) of each fsynced descriptor
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    sealed = spool.seal_new(received, "1.2/3.4/5.6.dcm")
    assert sealed == Sealed(len(payload), hashlib.sha256(payload).hexdigest())

    def identity(path: Path) -> tuple[int, int]:
        info = path.stat()
        return info.st_dev, info.st_ino

    assert sorted(synced) == sorted([identity(received), identity(spool.unindexed),
                                     identity(spool.path_of("1.2/3.4"))])
    known = Sealed(1, "given")  # a digest taken while writing is not computed again
    assert spool.seal_new(received, "1.2/3.4/5.6.dcm", known) is known

    def failing_fsync(fd: int) -> None:
        if os.path.samefile(f"/proc/self/fd/{fd}", spool.unindexed):
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as raised:  # a failed directory fsync is no success
        spool.seal_new(received, "1.2/3.4/5.6.dcm")
    assert raised.value.errno == errno.EIO
