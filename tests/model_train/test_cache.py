"""The preprocessing cache: shared method code, resumable, keyed by method and parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ctdx.model_train.cache import build_cache, cache_root, entry_path, load_cached, slice_key
from ctdx.model_train.importers.medseg import import_medseg
from ctdx.model_train.method.preprocess import PreprocessParams, gray_to_uint8, normalise_batch
from ctdx.model_train.method.segmentation_torch import segment_lungs_torch
from ctdx.model_train.phantom import write_phantom_series
from ctdx.model_train.sources import SliceSource, dicom_slice, expand_rows
from ctdx.model_train.synthetic import write_manifestation_set


def test_cache_is_the_shared_preprocessing_and_resumes(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "s", "covid19", n_slices=6, size=96, seed=2)
    sources = [SliceSource(p, 0) for p in study.paths]
    params = PreprocessParams(size=32)
    report = build_cache(sources, tmp_path / "cache", params, workers=1)
    assert (report.total, report.computed, report.reused, report.failures) == (6, 6, 0, ())
    cached = load_cached(sources, tmp_path / "cache", params)
    assert cached.present.all() and cached.gray.shape == (6, 32, 32)
    # identical to running the method directly (as the worker does on a series)
    hu = torch.from_numpy(np.stack([dicom_slice(p).hu for p in study.paths]))
    lung = segment_lungs_torch(hu, spacing_mm=350 / 96)
    direct = gray_to_uint8(normalise_batch(hu, lung, params), params)[:, 0].numpy()
    np.testing.assert_array_equal(cached.gray, direct)
    np.testing.assert_allclose(cached.lung_fraction, lung.float().mean(dim=(1, 2)).numpy())

    # resumable: a lost entry is recomputed, the others are reused
    entry_path(cache_root(tmp_path / "cache", params), slice_key(sources[3])).unlink()
    again = build_cache(sources, tmp_path / "cache", params, workers=1)
    assert (again.computed, again.reused) == (1, 5)
    # other preprocessing parameters live in another folder: nothing is reused
    other = PreprocessParams(size=48)
    assert cache_root(tmp_path / "cache", other) != cache_root(tmp_path / "cache", params)
    assert build_cache(sources, tmp_path / "cache", other, workers=1).reused == 0


def test_unreadable_slices_are_reported_not_fatal(tmp_path: Path) -> None:
    study = write_phantom_series(tmp_path / "s", "normal", n_slices=2, size=64, seed=1)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"nope")
    sources = [SliceSource(study.paths[0], 0), SliceSource(bad, 1)]
    report = build_cache(sources, tmp_path / "cache", PreprocessParams(size=32), workers=1)
    assert report.computed == 1 and [p for p, _ in report.failures] == [str(bad)]
    cached = load_cached(sources, tmp_path / "cache", PreprocessParams(size=32))
    assert cached.present.tolist() == [True, False]


def test_cropped_images_get_a_frame_for_segmentation(tmp_path: Path, shared_data: Path) -> None:
    rows = import_medseg(shared_data / "medseg-covid19-ggo-consolidation")[:4]
    params = PreprocessParams(size=32)
    framed = expand_rows(rows)
    unframed = [SliceSource(s.path, s.row, s.rotate, s.window, s.pixel_spacing, cropped=False)
                for s in framed]
    build_cache([*framed, *unframed], tmp_path / "cache", params, workers=1)
    with_frame = load_cached(framed, tmp_path / "cache", params).lung_fraction
    without = load_cached(unframed, tmp_path / "cache", params).lung_fraction
    # MedSeg slices are cropped inside the chest: without the frame the lungs touch the
    # border, the chest step's flood fill removes them, and most slices lose their lung
    assert np.median(with_frame) > 0.3
    assert np.median(without) < 0.1


def test_synthetic_manifestation_images_segment(tmp_path: Path) -> None:
    root = write_manifestation_set(tmp_path / "m", per_class=1, size=96, seed=0)
    sources = expand_rows(import_medseg(root))
    params = PreprocessParams(size=32)
    build_cache(sources, tmp_path / "cache", params, workers=1)
    assert (load_cached(sources, tmp_path / "cache", params).lung_fraction > 0.3).all()
