"""C-STORE over real associations: durable storage, rows, transfer syntaxes, completion."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import select

from ctdx.db.models import Instance, Series, Study, VersionState
from ctdx.db.session import session_scope
from ctdx.model_train.phantom import phantom_datasets
from tests.scp.conftest import Running, associate, phantom, send_files, wait_for


def _data_set_bytes(path: Path) -> bytes:
    """The bytes after the File Meta (what travelled over the network)."""
    with path.open("rb") as fh:
        pydicom.filereader.read_preamble(fh, force=False)
        pydicom.filereader._read_file_meta_info(fh)
        return fh.read()


def test_echo_is_answered(scp_sqlite: Running) -> None:
    with associate(scp_sqlite.port) as assoc:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000


def test_series_is_stored_durably_once_with_its_rows(scp: Running, tmp_path: Path) -> None:
    study = phantom(tmp_path, n_slices=5)
    assert send_files(scp.port, study.paths) == [0x0000] * 5

    files = scp.spool_files()
    assert len(files) == 5
    with session_scope(scp.engine) as s:
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        stored_study = s.scalars(select(Study)).one()
        series = s.scalars(select(Series)).one()
    assert set(rows) == set(study.sop_instance_uids)
    assert stored_study.study_instance_uid == study.study_instance_uid
    assert stored_study.patient_id == "PHANTOM-0001"
    assert series.modality == "CT" and series.series_number == 2
    for source in study.paths:
        sop = source.stem
        row = rows[sop]
        stored = scp.spool / row.path
        assert row.path == f"{study.study_instance_uid}/{study.series_instance_uid}/{sop}.dcm"
        # the bytes as they came: the data set on disk is the one on the sender's disk
        assert _data_set_bytes(stored) == _data_set_bytes(source)
        assert row.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert row.size_bytes == stored.stat().st_size
        assert row.transfer_syntax_uid == ExplicitVRLittleEndian
        assert row.calling_ae_title == "TESTSCU"
    assert scp.incoming_files() == []

    # the quiet period completes the version and the outbox hands it over
    wait_for(lambda: scp.versions()[0].state == VersionState.QUEUED, timeout=20,
             message="study handed to the queue")
    (version,) = scp.versions()
    assert version.instance_count == 5
    assert version.completion_reason == "quiet"
    assert version.state == VersionState.QUEUED
    assert scp.sender.sent == [version.id]
    (entry,) = scp.outbox()
    assert entry.dispatched_at is not None and entry.study_version_id == version.id


def _deflated_series(out: Path, n: int) -> list[Path]:
    out.mkdir(parents=True)
    paths = []
    for ds in phantom_datasets("normal", n_slices=n, size=64, seed=5):
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless,
     DeflatedExplicitVRLittleEndian],
    ids=["implicit", "rle", "jpeg-ls", "j2k", "deflated"],
)
def test_transfer_syntaxes_are_stored_as_received(
    scp_sqlite: Running, tmp_path: Path, syntax: str
) -> None:
    if syntax == DeflatedExplicitVRLittleEndian:
        paths = _deflated_series(tmp_path / "deflated", 3)
    elif syntax == ImplicitVRLittleEndian:
        study = phantom(tmp_path, n_slices=3)
        paths = []
        for path in study.paths:
            ds = pydicom.dcmread(path)
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    else:
        paths = list(phantom(tmp_path, n_slices=3, transfer_syntax_uid=syntax).paths)
    assert send_files(scp_sqlite.port, paths) == [0x0000] * 3
    with session_scope(scp_sqlite.engine) as s:
        rows = list(s.scalars(select(Instance)))
    assert {r.transfer_syntax_uid for r in rows} == {syntax}
    by_sop = {r.sop_instance_uid: r for r in rows}
    for source in paths:
        stored = scp_sqlite.spool / by_sop[source.stem].path
        assert _data_set_bytes(stored) == _data_set_bytes(source)  # never re-encoded
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == syntax
        # and the pixels decode to the sender's
        assert (pydicom.dcmread(stored).pixel_array == pydicom.dcmread(source).pixel_array).all()


def test_enhanced_ct_multiframe_is_stored(scp_sqlite: Running, tmp_path: Path) -> None:
    from pydicom.uid import EnhancedCTImageStorage, generate_uid

    from tests.scp.conftest import send_datasets

    source = pydicom.dcmread(phantom(tmp_path, n_slices=1).paths[0])
    ds = pydicom.Dataset()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientID",
                    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        setattr(ds, keyword, getattr(source, keyword))
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.NumberOfFrames = 3
    ds.PixelData = source.PixelData * 3
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    (response,) = send_datasets(scp_sqlite.port, [ds])
    assert response.Status == 0x0000
    with session_scope(scp_sqlite.engine) as s:
        row = s.scalars(select(Instance)).one()
    assert row.sop_class_uid == EnhancedCTImageStorage
    assert pydicom.dcmread(scp_sqlite.spool / row.path).NumberOfFrames == 3

    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = source.PixelData * 2  # three frames announced, two sent
    (response,) = send_datasets(scp_sqlite.port, [ds])
    assert response.Status == 0xA901
