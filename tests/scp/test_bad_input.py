"""Bad input gets a clear answer: the right status, a log line naming why, no file left."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.scp.conftest import (
    Running,
    associate,
    chunked_send,
    phantom,
    send_files,
    status_of,
    wait_for,
)

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


@contextmanager
def _lenient_writing() -> Iterator[None]:
    """Let pydicom write the invalid values these tests are about."""
    previous = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        pydicom.config.settings.writing_validation_mode = previous


def _garbage(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")  # group length element
    path.write_bytes(data[:meta_end] + b"\x08\x00\x16\x00UI\xff\x7f" + b"\x00garbage" * 20)


def _missing_study_uid(ds: Dataset, path: Path) -> None:
    del ds.StudyInstanceUID
    ds.save_as(path, enforce_file_format=True)


def _path_in_uid(ds: Dataset, path: Path) -> None:
    ds.SeriesInstanceUID = "1.2.3/../../etc"
    ds.save_as(path, enforce_file_format=True)


def _dots_in_uid(ds: Dataset, path: Path) -> None:
    ds.StudyInstanceUID = "1.2..3"
    ds.save_as(path, enforce_file_format=True)


def _short_pixel_data(ds: Dataset, path: Path) -> None:
    ds.PixelData = ds.PixelData[:-1024]
    ds.save_as(path, enforce_file_format=True)


def _rows_mismatch(ds: Dataset, path: Path) -> None:
    ds.Rows = ds.Rows + 1
    ds.save_as(path, enforce_file_format=True)


def _no_pixel_data(ds: Dataset, path: Path) -> None:
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)


def _mr_under_ct(ds: Dataset, path: Path) -> None:
    ds.Modality = "MR"
    ds.save_as(path, enforce_file_format=True)


def _save_keeping_meta(ds: Dataset, path: Path) -> None:
    """Write the File Meta as it is, even where it now disagrees with the data set."""
    meta = ds.file_meta
    ds.save_as(path, enforce_file_format=True)
    written = pydicom.dcmread(path)
    written.file_meta = meta
    written.save_as(path, enforce_file_format=False)


def _class_mismatch(ds: Dataset, path: Path) -> None:
    ds.SOPClassUID = MRImageStorage  # the command (from the File Meta) still says CT
    _save_keeping_meta(ds, path)


def _instance_mismatch(ds: Dataset, path: Path) -> None:
    ds.SOPInstanceUID = generate_uid()  # the command says the File Meta's UID
    _save_keeping_meta(ds, path)


CASES: list[tuple[str, Callable[[Dataset, Path], None], int, str]] = [
    ("unparseable", _garbage, 0xC210, "cannot be parsed"),
    ("missing-study-uid", _missing_study_uid, 0xC220, "StudyInstanceUID is missing"),
    ("path-in-uid", _path_in_uid, 0xC221, "SeriesInstanceUID is not a valid UID"),
    ("double-dot-uid", _dots_in_uid, 0xC221, "StudyInstanceUID is not a valid UID"),
    ("short-pixel-data", _short_pixel_data, 0xA901, "Pixel Data length"),
    ("rows-mismatch", _rows_mismatch, 0xA901, "Pixel Data length"),
    ("no-pixel-data", _no_pixel_data, 0xA901, "no Pixel Data"),
    ("mr-under-ct-class", _mr_under_ct, 0xA900, "Modality is MR, not CT"),
    ("sop-class-mismatch", _class_mismatch, 0xA900, "SOPClassUID differs"),
    ("sop-instance-mismatch", _instance_mismatch, 0xA902, "SOPInstanceUID differs"),
]


@pytest.mark.parametrize(("name", "spoil", "status", "reason"), CASES, ids=[c[0] for c in CASES])
def test_bad_instance_gets_status_reason_and_leaves_nothing(
    scp_sqlite: Running,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
    spoil: Callable[[Dataset, Path], None],
    status: int,
    reason: str,
) -> None:
    scp = scp_sqlite
    study = phantom(tmp_path, n_slices=2)
    bad = tmp_path / f"{name}.dcm"
    ds = pydicom.dcmread(study.paths[0])
    with _lenient_writing():
        spoil(ds, bad)
    caplog.set_level(logging.INFO)
    with chunked_send(), associate(scp.port, [ExplicitVRLittleEndian]) as assoc:
        response = assoc.send_c_store(bad)
        assert status_of(response) == status
        assert reason in response.ErrorComment
        # the association and the listener go on serving
        assert status_of(assoc.send_c_store(study.paths[1])) == 0x0000
    refusal = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusal) == 1 and reason in refusal[0].getMessage()
    assert f"0x{status:04X}" in refusal[0].getMessage()
    assert "PHANTOM" not in caplog.text  # no patient name or ID in the log
    assert [p.stem for p in scp.spool_files()] == [study.sop_instance_uids[1]]
    assert scp.incoming_files() == []
    assert scp.instance_count() == 1
    assert not list(scp.spool.rglob("etc"))


def test_out_of_disk_is_refused_before_writing(
    start_scp_sqlite: Callable[..., Running], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scp = start_scp_sqlite(min_free_bytes=10**18)
    study = phantom(tmp_path, n_slices=1)
    caplog.set_level(logging.INFO)
    assert send_files(scp.port, study.paths) == [0xA700]
    assert "below the" in caplog.text and "0xA700" in caplog.text
    assert scp.spool_files() == [] and scp.incoming_files() == []
    assert scp.instance_count() == 0


def test_unknown_calling_ae_is_rejected_at_association(
    start_scp_sqlite: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    scp = start_scp_sqlite(allowed_calling_aes="SCANNER1,PACS")
    caplog.set_level(logging.INFO)
    with associate(scp.port, ae_title="INTRUDER") as assoc:
        assert assoc.is_rejected
        assert (assoc.acceptor.primitive.result_source, assoc.acceptor.primitive.diagnostic) == (
            0x01, 0x03,
        )
    assert "INTRUDER" in caplog.text and "calling AE title not allowed" in caplog.text
    with associate(scp.port, ae_title="SCANNER1") as assoc:
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000


def test_other_sop_classes_and_lossy_syntaxes_are_refused_at_negotiation(
    scp_sqlite: Running,
) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage, [JPEGBaseline8Bit])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp_sqlite.port, ae_title="CTDX")
    try:
        assert assoc.is_established
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        assert accepted == {(CTImageStorage, ExplicitVRLittleEndian)}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        assert rejected == {MRImageStorage, CTImageStorage}
    finally:
        assoc.release()


def test_association_limit(start_scp_sqlite: Callable[..., Running]) -> None:
    scp = start_scp_sqlite(max_associations=1)
    with associate(scp.port) as first:
        assert first.is_established
        with associate(scp.port) as second:
            assert second.is_rejected
            assert second.acceptor.primitive.diagnostic == 0x02  # local limit exceeded
    server = scp.service.listener._server
    assert server is not None
    wait_for(lambda: not server.active_associations, timeout=10, message="both threads ended")
    with associate(scp.port) as third:
        assert third.is_established
