"""A localiser (scout) inside the axial series, as real exports often have it (PS3.3
C.8.2.1.1.1: CT Image Type value 3 is AXIAL or LOCALIZER): left out, the series analysed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctdx.model_train.phantom import write_phantom_series
from ctdx.worker.errors import NoUsableSeries
from ctdx.worker.loading import is_localizer, iter_batches, order_series
from ctdx.worker.series_selection import describe_series, load_rules, select_series
from ctdx.worker.study import SeriesRef
from tests.worker.conftest import instance_refs

SIZE, N = 32, 20  # the default rules want at least 16 slices


def _series(tmp_path: Path, localizers: list[int]) -> tuple[list[Path], list[str]]:
    """N axial slices plus a coronal localiser at each index in ``localizers`` (0 = first);
    returns the files in series order and the localisers' SOP Instance UIDs."""
    study = write_phantom_series(tmp_path / "s", "covid19", n_slices=N + len(localizers),
                                 size=SIZE, seed=5)
    scouts = []
    for index in localizers:
        ds = pydicom.dcmread(study.paths[index])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.save_as(study.paths[index])
        scouts.append(str(ds.SOPInstanceUID))
    return list(study.paths), scouts


def _ref(paths: list[Path]) -> SeriesRef:
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return SeriesRef(str(ds.SeriesInstanceUID), 1, "CT", None, tuple(instance_refs(paths)))


@pytest.mark.parametrize("where", ["first", "last", "both"])
def test_a_localiser_in_the_axial_series_is_left_out_and_the_rest_analysed(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    indices = {"first": [0], "last": [N], "both": [0, N + 1]}[where]
    paths, scouts = _series(tmp_path, indices)
    candidate = describe_series(_ref(paths))
    assert candidate.axial_cosine == pytest.approx(1.0)  # described by an axial slice
    assert "LOCALIZER" not in candidate.image_type
    selection = select_series([_ref(paths)], load_rules(None))  # the default rules take it
    with caplog.at_level(logging.INFO, logger="ctdx.worker.loading"):
        series = order_series(selection.series.instances)
    kept = [s.sop_instance_uid for s in series.slices]
    assert len(kept) == N and not set(kept) & set(scouts)
    assert series.normal == pytest.approx((0.0, 0.0, 1.0))
    assert f"{len(scouts)} localiser instance(s) left out" in caplog.text
    hu = np.concatenate([b.hu for b in iter_batches(series, batch_size=8)])
    assert hu.shape == (N, SIZE, SIZE)


def test_a_series_of_localisers_only_is_not_a_candidate(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "s", "normal", n_slices=2, size=SIZE, seed=1)
    for path in study.paths:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    ref = _ref(list(study.paths))
    assert "LOCALIZER" in describe_series(ref).image_type
    with pytest.raises(NoUsableSeries, match="LOCALIZER"):
        select_series([ref], load_rules(None))


@pytest.mark.parametrize(("image_type", "expected"), [
    (["ORIGINAL", "PRIMARY", "LOCALIZER"], True),
    (["DERIVED", "SECONDARY", "LOCALIZER", "OTHER"], True),
    (["ORIGINAL", "PRIMARY", "AXIAL"], False),
    (["DERIVED", "SECONDARY"], False),  # value 3 absent
    ("LOCALIZER", False),  # a single value is value 1, not value 3
    (None, False),
])
def test_is_localizer_reads_value_3(image_type: object, expected: bool) -> None:
    ds = pydicom.Dataset()
    if image_type is not None:
        ds.ImageType = image_type
    assert is_localizer(ds) is expected
