"""Enhanced CT (one multi-frame instance per series): loaded, selected and analysed like classic CT.

The fixture is the same phantom written both ways (``write_phantom_series`` and
``write_enhanced_phantom``), its frames stored in a shuffled order, so every
comparison is against the classic reading of identical HU.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless
from sqlalchemy import Engine, select

from ctdx.db.models import Analysis, SliceResult
from ctdx.db.session import make_engine, session_scope
from ctdx.db.settings import Settings
from ctdx.model_train.phantom import write_enhanced_phantom, write_phantom_series
from ctdx.worker import runtime, service
from ctdx.worker.errors import InconsistentSeries, NoUsableSeries
from ctdx.worker.loading import iter_batches, order_series
from ctdx.worker.series_selection import choose, describe_series, load_rules
from ctdx.worker.service import Outcome
from ctdx.worker.study import SeriesRef
from tests.report.conftest import dciodvfy
from tests.worker.conftest import Checkpoints, StoredStudy, analysis_settings, instance_refs

N, SIZE = 12, 64


def _order(n: int = N, seed: int = 0) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    assert order != sorted(order)
    return order


def _hu(paths: list[Path], batch_size: int = 5) -> np.ndarray:
    series = order_series(instance_refs(paths))
    return np.concatenate([b.hu for b in iter_batches(series, batch_size=batch_size)])


def test_enhanced_ct_fixture_is_a_valid_iod(tmp_path: Path) -> None:
    study = write_enhanced_phantom(tmp_path, "covid19", n_slices=4, size=32, seed=1,
                                   frame_order=[2, 0, 3, 1], per_frame_rescale=True)
    errors, warnings = dciodvfy(study.paths[0])
    assert errors == [] and warnings == []


@pytest.mark.parametrize(
    ("per_frame_rescale", "syntax"),
    [(False, None), (True, None), (True, RLELossless)],
    ids=["shared-rescale", "per-frame-rescale", "rle"],
)
def test_frames_are_ordered_by_position_with_the_hu_of_the_classic_series(
    tmp_path: Path, per_frame_rescale: bool, syntax: str | None
) -> None:
    order = _order()
    enhanced = write_enhanced_phantom(tmp_path / "e", "covid19", n_slices=N, size=SIZE, seed=3,
                                      frame_order=order, per_frame_rescale=per_frame_rescale,
                                      transfer_syntax_uid=syntax)
    classic = write_phantom_series(tmp_path / "c", "covid19", n_slices=N, size=SIZE, seed=3)
    series = order_series(instance_refs(list(enhanced.paths)))
    assert len(series.slices) == N
    positions = [s.position for s in series.slices]
    assert positions == sorted(positions) and positions[0] == -2.0 * (N - 1)
    # ascending position = phantom slices from the last (z = -22) to the first (z = 0)
    assert [s.frame_number for s in series.slices] == [
        order.index(N - 1 - i) + 1 for i in range(N)
    ]
    assert {s.sop_instance_uid for s in series.slices} == {enhanced.sop_instance_uids[0]}
    assert series.slices[0].pixel_area_mm2 == pytest.approx((350.0 / SIZE) ** 2)
    threads = 2 if syntax else 1  # the compressed case also decodes in a thread pool
    batches = list(iter_batches(series, batch_size=5, decode_threads=threads))
    assert [len(b.slices) for b in batches] == [5, 5, 2]  # streamed frame batches
    np.testing.assert_array_equal(np.concatenate([b.hu for b in batches]),
                                  _hu(list(classic.paths)))


def _rewrite(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def test_inconsistent_frames_are_refused_naming_the_frame(tmp_path: Path) -> None:
    study = write_enhanced_phantom(tmp_path / "e", "normal", n_slices=6, size=32, seed=0)
    path = study.paths[0]
    original = path.read_bytes()

    def tilt_frame_4(ds: pydicom.Dataset) -> None:
        frame = ds.PerFrameFunctionalGroupsSequence[3]
        frame.PlaneOrientationSequence = [pydicom.Dataset()]
        frame.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]

    _rewrite(path, tilt_frame_4)
    with pytest.raises(InconsistentSeries, match=r"differ in orientation: .* frame 4"):
        order_series(instance_refs([path]))

    path.write_bytes(original)
    _rewrite(path, lambda ds: delattr(ds.PerFrameFunctionalGroupsSequence[2],
                                      "PlanePositionSequence"))
    with pytest.raises(InconsistentSeries, match="frame 3 has no usable Plane Position"):
        order_series(instance_refs([path]))

    path.write_bytes(original)
    _rewrite(path, lambda ds: setattr(ds, "NumberOfFrames", 5))
    with pytest.raises(InconsistentSeries, match="NumberOfFrames is 5 but .* 6 items"):
        order_series(instance_refs([path]))

    # two Enhanced CT instances of one series whose frames differ in size
    other = write_enhanced_phantom(tmp_path / "o", "normal", n_slices=3, size=48, seed=0)
    path.write_bytes(original)
    with pytest.raises(InconsistentSeries, match="differ in size"):
        order_series(instance_refs([path, other.paths[0]]))


def test_classic_and_enhanced_in_one_series_is_refused(tmp_path: Path) -> None:
    enhanced = write_enhanced_phantom(tmp_path / "e", "normal", n_slices=4, size=32, seed=0)
    classic = write_phantom_series(tmp_path / "c", "normal", n_slices=4, size=32, seed=0)
    with pytest.raises(InconsistentSeries, match="mixes 4 single-frame .* and 1 multi-frame"):
        order_series(instance_refs([*classic.paths, *enhanced.paths]))

    # a multi-frame instance without functional groups cannot be placed frame by frame
    ds = pydicom.dcmread(classic.paths[0])
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(classic.paths[0])
    with pytest.raises(InconsistentSeries, match="2 frames but no functional groups"):
        order_series(instance_refs([classic.paths[0]]))


def _series(paths: list[Path], number: int) -> SeriesRef:
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return SeriesRef(str(ds.SeriesInstanceUID), number, "CT", None, tuple(instance_refs(paths)))


def test_selection_counts_frames_as_slices_and_reads_the_functional_groups(
    tmp_path: Path,
) -> None:
    enhanced = write_enhanced_phantom(tmp_path / "e", "normal", n_slices=20, size=32, seed=0)
    classic = write_phantom_series(tmp_path / "c", "normal", n_slices=18, size=32, seed=0)
    cand = describe_series(_series(list(enhanced.paths), 3))
    assert cand.slice_count == 20 and cand.number_of_frames == 20
    assert cand.slice_thickness == 2.0 and cand.convolution_kernel == "LUNG"
    assert cand.axial_cosine == 1.0 and cand.sop_class == "Enhanced CT Image Storage"
    rules = load_rules(None)
    classic_cand = describe_series(_series(list(classic.paths), 2))
    assert classic_cand.sop_class == "CT Image Storage"
    index, reason = choose([classic_cand, cand], rules)
    assert index == 1 and reason.startswith("analysed series 3")  # most slices: 20 frames > 18
    assert "series 2" in reason and "slice count 18 vs 20 (highest preferred)" in reason

    thin = replace(classic_cand, slice_thickness=1.0)
    index, reason = choose([thin, cand], rules)
    assert index == 0 and "slice thickness 2 vs 1 (lowest preferred)" in reason


def test_other_multiframe_sop_classes_are_not_candidates(tmp_path: Path) -> None:
    enhanced = write_enhanced_phantom(tmp_path / "e", "normal", n_slices=20, size=32, seed=0)
    cand = describe_series(_series(list(enhanced.paths), 3))
    other = replace(cand, sop_class="Secondary Capture Image Storage")
    with pytest.raises(NoUsableSeries, match="sop_class Secondary Capture Image Storage not in"):
        choose([other], load_rules(None))


# -- the worker: the same phantom analysed as classic and as Enhanced CT -------------------


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str, checkpoints: Checkpoints,
             small_rules: Path) -> Settings:
    return analysis_settings(tmp_path / "data", sqlite_url, checkpoints, small_rules,
                             batch_size=5)


def _slices(db: Engine, analysis_id: int | None) -> list[SliceResult]:
    with session_scope(db) as session:
        return list(session.scalars(select(SliceResult).where(
            SliceResult.analysis_id == analysis_id).order_by(SliceResult.slice_index)))


def test_worker_analyses_enhanced_ct_like_the_classic_series(
    tmp_path: Path, settings: Settings, store: Callable[..., StoredStudy]
) -> None:
    order = _order(N, seed=4)
    url = settings.resolved_database_url
    enhanced = write_enhanced_phantom(tmp_path / "e", "covid19", n_slices=N, size=SIZE, seed=2,
                                      frame_order=order, per_frame_rescale=True)
    classic = write_phantom_series(tmp_path / "c", "covid19", n_slices=N, size=SIZE, seed=2)
    stored_e = store(url, list(enhanced.paths))
    stored_c = store(url, list(classic.paths))
    db = make_engine(url)
    try:
        models = runtime.get_models(settings)
        done_e = service.process_study_version(db, settings, models, stored_e.study_version_id)
        done_c = service.process_study_version(db, settings, models, stored_c.study_version_id)
        assert done_e.outcome is Outcome.ANALYSED, done_e.detail
        assert done_c.outcome is Outcome.ANALYSED, done_c.detail
        with session_scope(db) as session:
            a_e = session.get_one(Analysis, done_e.analysis_id)
            a_c = session.get_one(Analysis, done_c.analysis_id)
            summary_e = (a_e.decision, a_e.slices_total, a_e.slices_analysed, a_e.slices_skipped,
                         a_e.fraction_covid19, a_e.manifestation_counts)
            summary_c = (a_c.decision, a_c.slices_total, a_c.slices_analysed, a_c.slices_skipped,
                         a_c.fraction_covid19, a_c.manifestation_counts)
            reason = a_e.series_selection or ""
        assert summary_e == summary_c and summary_e[1] == N
        assert "analysed series 3" in reason and f"{N} slices" in reason
        rows_e, rows_c = _slices(db, done_e.analysis_id), _slices(db, done_c.analysis_id)
    finally:
        db.dispose()
    assert {r.sop_instance_uid for r in rows_e} == set(enhanced.sop_instance_uids)
    assert [r.frame_number for r in rows_e] == [order.index(N - 1 - i) + 1 for i in range(N)]
    assert all(r.frame_number is None for r in rows_c)
    assert [r.position_z for r in rows_e] == [r.position_z for r in rows_c]
    for e, c in zip(rows_e, rows_c, strict=True):
        assert (e.skipped, e.predicted_class, e.manifestation) == (
            c.skipped, c.predicted_class, c.manifestation)
        assert e.lung_fraction == pytest.approx(c.lung_fraction)
        assert e.lung_area_mm2 == pytest.approx(c.lung_area_mm2)
        if not e.skipped:
            assert e.p_covid19 == pytest.approx(c.p_covid19, abs=1e-5)


class _Recorder:
    """The listener's outbox hands study versions here instead of to a broker."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, study_version_id: int) -> None:
        self.sent.append(study_version_id)


@pytest.mark.dcmtk
def test_enhanced_ct_sent_with_storescu_is_stored_by_the_listener_and_analysed(
    tmp_path: Path, sqlite_url: str, checkpoints: Checkpoints, small_rules: Path
) -> None:
    """dcmtk storescu -> the real listener (spool, database, completion, outbox) -> the worker."""
    import subprocess

    from ctdx.scp.server import ScpService
    from tests.conftest import free_port, require_tool, wait_for

    settings = analysis_settings(
        tmp_path / "data", sqlite_url, checkpoints, small_rules, batch_size=5,
        host="127.0.0.1", port=free_port(), quiet_seconds=0.5, outbox_poll_seconds=0.1,
        min_free_bytes=0,
    )
    order = _order(N, seed=5)
    study = write_enhanced_phantom(tmp_path / "e", "covid19", n_slices=N, size=SIZE, seed=2,
                                   frame_order=order)
    recorder = _Recorder()
    listener = ScpService(settings, sender=recorder)
    listener.start()
    try:
        subprocess.run(
            [require_tool("storescu"), "-aet", "SCANNER", "-aec", "CTDX", "127.0.0.1",
             str(listener.port), str(study.paths[0])],
            check=True, capture_output=True, timeout=60,
        )
        wait_for(lambda: recorder.sent, timeout=20, message="the study handed to the queue")
    finally:
        listener.stop()
    [version_id] = recorder.sent
    db = make_engine(settings.resolved_database_url)
    try:
        done = service.process_study_version(db, settings, runtime.get_models(settings),
                                             version_id)
        assert done.outcome is Outcome.ANALYSED, done.detail
        rows = _slices(db, done.analysis_id)
    finally:
        db.dispose()
    assert [r.frame_number for r in rows] == [order.index(N - 1 - i) + 1 for i in range(N)]
    assert {r.sop_instance_uid for r in rows} == set(study.sop_instance_uids)


def test_truncated_multiframe_pixel_data_names_the_instance(tmp_path: Path) -> None:
    from ctdx.worker.errors import UndecodablePixelData

    study = write_enhanced_phantom(tmp_path / "e", "normal", n_slices=6, size=32, seed=0,
                                   frame_order=[5, 4, 3, 2, 1, 0])
    _rewrite(study.paths[0], lambda ds: setattr(ds, "PixelData", ds.PixelData[:32 * 32 * 2 * 3]))
    series = order_series(instance_refs(list(study.paths)))
    with pytest.raises(UndecodablePixelData, match=study.sop_instance_uids[0]) as info:
        list(iter_batches(series, batch_size=4))
    assert "frame" in str(info.value)
