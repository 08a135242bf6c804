"""Reading a series: position order, every accepted transfer syntax, HU, undecodable pixel data."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from ctdx.model_train.method.hu import MIN_HU
from ctdx.model_train.phantom import phantom_volume, write_phantom_series
from ctdx.worker.errors import InconsistentSeries, UndecodablePixelData
from ctdx.worker.loading import decode_hu, iter_batches, order_series
from tests.conftest import require_tool
from tests.worker.conftest import instance_refs

SIZE, N = 64, 12


def _expected_hu() -> np.ndarray:
    volume = phantom_volume("covid19", n_slices=N, size=SIZE, seed=3)
    # phantom z runs 0, -2, -4 ...: ascending position is the reverse of the phantom order
    stack = np.stack([s.hu for s in volume[::-1]]).astype(np.float32)
    return np.maximum(stack, MIN_HU)


def _read_all(paths: list[Path]) -> np.ndarray:
    series = order_series(instance_refs(paths))
    batches = list(iter_batches(series, batch_size=5))
    assert [len(b.slices) for b in batches] == [5, 5, 2]  # streamed, never the whole series
    return np.concatenate([b.hu for b in batches])


def test_slices_are_ordered_by_position_not_instance_number_or_file_name(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "s", "covid19", n_slices=N, size=SIZE, seed=3)
    numbers = list(range(1, N + 1))
    random.Random(0).shuffle(numbers)
    paths = []
    for path, number in zip(study.paths, numbers, strict=True):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = number
        renamed = tmp_path / "s" / f"{number:03d}.dcm"
        ds.save_as(renamed)
        path.unlink()
        paths.append(renamed)
    random.Random(1).shuffle(paths)
    series = order_series(instance_refs(paths))
    positions = [s.position for s in series.slices]
    assert positions == sorted(positions) and positions[0] == -2.0 * (N - 1)
    assert [s.index for s in series.slices] == list(range(N))
    assert series.slices[0].pixel_area_mm2 == pytest.approx((350.0 / SIZE) ** 2)
    np.testing.assert_array_equal(_read_all(paths), _expected_hu())


def test_order_follows_the_slice_normal_of_a_tilted_series(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "s", "normal", n_slices=6, size=SIZE, seed=1)
    # sagittal orientation: row (0,1,0) x column (0,0,-1) = normal (-1,0,0): -x orders, not z
    xs = [5.0, -3.0, 12.0, 0.0, 7.5, -10.0]
    for path, x in zip(study.paths, xs, strict=True):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [x, -175.0, 100.0 - x]  # z deliberately anti-correlated
        ds.save_as(path)
    series = order_series(instance_refs(list(study.paths)))
    assert [s.position for s in series.slices] == sorted(-x for x in xs)
    by_x = sorted(zip(xs, study.paths, strict=True), reverse=True)
    assert [s.path for s in series.slices] == [p for _, p in by_x]


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEGLSLossless,
     JPEG2000Lossless, JPEGLosslessSV1, "1.2.840.10008.1.2.4.57"],
    ids=["implicit", "deflated", "rle", "jpeg-ls", "jpeg2000", "jpeg-lossless-sv1",
         "jpeg-lossless"],
)
def test_every_lossless_transfer_syntax_decodes_to_the_same_hu(tmp_path: Path, syntax: str) -> None:
    study = write_phantom_series(tmp_path / "src", "covid19", n_slices=N, size=SIZE, seed=3)
    out = tmp_path / "out"
    out.mkdir()
    paths = []
    for path in study.paths:
        target = out / path.name
        if syntax.startswith("1.2.840.10008.1.2.4.5") or syntax == JPEGLosslessSV1:
            flag = "+e1" if syntax == JPEGLosslessSV1 else "+el"
            subprocess.run([require_tool("dcmcjpeg"), flag, str(path), str(target)], check=True)
        else:
            ds = pydicom.dcmread(path)
            if syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
                ds.file_meta.TransferSyntaxUID = syntax
                ds.save_as(target, implicit_vr=syntax == ImplicitVRLittleEndian,
                           little_endian=True)
            else:
                ds.compress(syntax)
                ds.save_as(target)
        assert str(pydicom.dcmread(target, stop_before_pixels=True)
                   .file_meta.TransferSyntaxUID) == syntax
        paths.append(target)
    np.testing.assert_array_equal(_read_all(paths), _expected_hu())


def test_rescale_slope_and_intercept_give_hu_per_instance(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "s", "normal", n_slices=2, size=SIZE, seed=0)
    ds = pydicom.dcmread(study.paths[0])
    raw = ds.pixel_array.astype(np.int32)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -2048
    ds.PixelData = (raw // 2).astype(np.uint16).tobytes()  # stored*2 - 2048 = raw - 1024 (+-1)
    ds.save_as(study.paths[0])
    series = order_series(instance_refs(list(study.paths)))
    first = next(s for s in series.slices if s.path == study.paths[0])
    hu = decode_hu(first)
    expected = np.maximum((raw // 2) * 2.0 - 2048.0, MIN_HU)
    np.testing.assert_array_equal(hu, expected)
    assert hu.dtype == np.float32 and hu.min() >= MIN_HU


def test_truncated_pixel_data_names_the_instance(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "s", "normal", n_slices=3, size=SIZE, seed=0)
    ds = pydicom.dcmread(study.paths[1])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(study.paths[1])
    series = order_series(instance_refs(list(study.paths)))
    with pytest.raises(UndecodablePixelData) as info:
        list(iter_batches(series, batch_size=2))
    assert info.value.sop_instance_uid == study.sop_instance_uids[1]
    assert study.sop_instance_uids[1] in str(info.value)


def test_corrupt_jpeg_stream_names_the_instance(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "s", "normal", n_slices=2, size=SIZE, seed=0,
                                 transfer_syntax_uid=JPEGLSLossless)
    ds = pydicom.dcmread(study.paths[0])
    frame = bytearray(ds.PixelData)
    frame[40:] = bytes(len(frame) - 40)  # keep the item header, destroy the codestream
    ds.PixelData = bytes(frame)
    ds.save_as(study.paths[0])
    series = order_series(instance_refs(list(study.paths)))
    with pytest.raises(UndecodablePixelData, match=study.sop_instance_uids[0]):
        list(iter_batches(series, batch_size=4, decode_threads=2))


def test_not_dicom_and_missing_positions_are_domain_errors(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "s", "normal", n_slices=2, size=SIZE, seed=0)
    refs = instance_refs(list(study.paths))
    shutil.copy(study.paths[0], tmp_path / "backup.dcm")
    study.paths[0].write_bytes(b"not a dicom file at all")
    with pytest.raises(UndecodablePixelData, match=refs[0].sop_instance_uid):
        order_series(refs)
    ds = pydicom.dcmread(tmp_path / "backup.dcm")
    del ds.ImagePositionPatient
    ds.save_as(study.paths[0])
    with pytest.raises(InconsistentSeries, match="ImagePositionPatient"):
        order_series(refs)


def test_explicit_little_endian_is_the_phantom_default(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "s", "normal", n_slices=1, size=SIZE, seed=0)
    ts = pydicom.dcmread(study.paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts == ExplicitVRLittleEndian
