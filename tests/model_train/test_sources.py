"""Training reads pixels exactly as the worker does; 8-bit images map back to HU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctdx.model_train.phantom import write_phantom_series
from ctdx.model_train.sources import SliceSource, SourceError, dicom_slice, image_hu, load_slice
from ctdx.worker.loading import decode_hu, order_series
from ctdx.worker.study import InstanceRef


def _worker_hu(path: Path) -> np.ndarray:
    """The worker's own reading: its slice ordering and decoding of one instance."""
    ref = InstanceRef("1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", path)
    return decode_hu(order_series([ref]).slices[0])


def test_dicom_hu_matches_the_worker_bit_for_bit(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path, "covid19", n_slices=2, size=64, seed=3)
    for path in study.paths:
        loaded = dicom_slice(path)
        np.testing.assert_array_equal(loaded.hu, _worker_hu(path))
        assert loaded.spacing_mm == pytest.approx(350 / 64)


def test_real_jpeg_lossless_matches_the_worker(shared_data: Path) -> None:
    path = next(iter(sorted((shared_data / "covid-ct-md" / "CAP" / "cap001").glob("*.dcm"))))
    loaded = dicom_slice(path)
    np.testing.assert_array_equal(loaded.hu, _worker_hu(path))
    assert loaded.hu.min() >= -1024
    assert loaded.spacing_mm == pytest.approx(0.58984375)


def test_image_grey_maps_back_through_the_window_and_rotates_clockwise(tmp_path: Path) -> None:
    grey = np.array([[0, 255, 51]], dtype=np.uint8)  # one row, three columns
    Image.fromarray(grey).save(tmp_path / "a.png")
    hu = image_hu(tmp_path / "a.png", rotate=0, window=(-600.0, 1500.0))
    # black -> -1350 clipped to -1024 (air), white -> +150, 51 -> -1350 + 300 = -1050 -> -1024
    np.testing.assert_allclose(hu, [[-1024, 150, -1024]])
    hu = image_hu(tmp_path / "a.png", rotate=90, window=(0.0, 255.0))
    assert hu.shape == (3, 1)  # clockwise: the first column becomes the first row, top to bottom
    np.testing.assert_allclose(hu[:, 0], [-127.5, 127.5, -76.5])


def test_unreadable_files_are_domain_errors(tmp_path: Path) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not dicom")
    with pytest.raises(SourceError, match="x.dcm"):
        load_slice(SliceSource(bad, 0))
    with pytest.raises(SourceError, match="y.png"):
        load_slice(SliceSource(tmp_path / "y.png", 0))
