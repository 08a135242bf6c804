"""Series selection: rules as data, a readable reason, the two-reconstruction study."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from ctdx.db.session import make_engine, session_scope
from ctdx.model_train.phantom import write_phantom_series
from ctdx.worker.errors import NoUsableSeries
from ctdx.worker.series_selection import (
    RulesError,
    SeriesCandidate,
    choose,
    load_rules,
    rules_from_mapping,
    select_series,
)
from ctdx.worker.study import load_study_version

LUNG_PET_CT = "lung-pet-ct-dx/Lung_Dx-A0002"


def _select(url: str, tmp_path: Path, version_id: int, rules_path: Path | None = None):  # noqa: ANN202
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            ref = load_study_version(session, version_id, tmp_path / "data" / "spool")
    finally:
        engine.dispose()
    return select_series(ref.series, load_rules(rules_path))


@pytest.mark.shared_data
def test_two_reconstructions_analyse_the_lung_kernel_and_say_why(
    shared_data: Path, sqlite_url: str, tmp_path: Path, store: Callable[..., object]
) -> None:
    root = shared_data / LUNG_PET_CT
    stored = store(sqlite_url, sorted(root.glob("*/*.dcm")))
    sharp = pydicom.dcmread(next((root / "series2_ThoraxRoutine_8mm_B70f").glob("*.dcm")),
                            stop_before_pixels=True)
    selection = _select(sqlite_url, tmp_path, stored.study_version_id)  # type: ignore[attr-defined]
    assert selection.series.series_instance_uid == sharp.SeriesInstanceUID
    assert len(selection.series.instances) == 30
    assert selection.reason.startswith(f"analysed series 2 ({sharp.SeriesInstanceUID})")
    assert "kernel B70f" in selection.reason
    assert "series 3" in selection.reason and "B40f is not a preferred one" in selection.reason

    # the same study under a site's own rules (JSON): soft kernel wanted
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({
        "filters": [{"attribute": "modality", "in": ["CT"]}],
        "preferences": [{"attribute": "convolution_kernel", "prefer_match": ["B4*"]}],
    }))
    soft = _select(sqlite_url, tmp_path, stored.study_version_id, rules)  # type: ignore[attr-defined]
    assert soft.candidate.convolution_kernel == "B40f"
    assert "series 2" in soft.reason and "B70f is not a preferred one" in soft.reason


def _cand(**kw: object) -> SeriesCandidate:
    base: dict[str, object] = dict(
        series_instance_uid="1.2.3", series_number=1, modality="CT", slice_count=100,
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"), convolution_kernel="B30f",
        slice_thickness=1.0, axial_cosine=1.0, number_of_frames=1, rows=512, columns=512,
        sop_class="CT Image Storage",
    )
    base.update(kw)
    return SeriesCandidate(**base)  # type: ignore[arg-type]


def test_default_rules_filter_then_prefer_kernel_thickness_count() -> None:
    rules = load_rules(None)
    cands = [
        _cand(series_instance_uid="1.1", series_number=1, image_type=("ORIGINAL", "LOCALIZER")),
        _cand(series_instance_uid="1.2", series_number=2, slice_thickness=5.0),
        _cand(series_instance_uid="1.3", series_number=3, slice_thickness=1.0, slice_count=300),
        _cand(series_instance_uid="1.4", series_number=4, slice_thickness=1.0, slice_count=280),
        _cand(series_instance_uid="1.5", series_number=5, axial_cosine=0.0),  # coronal
        _cand(series_instance_uid="1.6", series_number=6, modality="PT"),
    ]
    index, reason = choose(cands, rules)
    assert cands[index].series_instance_uid == "1.3"
    assert "series 2 (1.2) not chosen: slice thickness 5 vs 1 (lowest preferred)" in reason
    assert "series 4 (1.4) not chosen: slice count 280 vs 300 (highest preferred)" in reason
    assert "series 1 (1.1): image_type contains LOCALIZER" in reason
    assert "series 5 (1.5): axial_cosine 0 < 0.9" in reason
    assert "series 6 (1.6): modality PT not in ['CT']" in reason

    sharp = _cand(series_instance_uid="1.7", series_number=7, convolution_kernel="LUNG",
                  slice_thickness=2.0)
    index, _ = choose([*cands, sharp], rules)
    assert index == len(cands)  # the lung kernel beats thinner soft-kernel slices


def test_no_ct_series_fails_with_every_series_named() -> None:
    cands = [_cand(series_instance_uid="9.1", modality="MR"),
             _cand(series_instance_uid="9.2", slice_count=3)]
    with pytest.raises(NoUsableSeries) as info:
        choose(cands, load_rules(None))
    message = str(info.value)
    assert message.startswith("no usable CT series")
    assert "(9.1): modality MR not in ['CT']" in message and "(9.2): slice_count 3 < 16" in message


def test_study_without_ct_series_from_the_database(
    sqlite_url: str, tmp_path: Path, store: Callable[..., object]
) -> None:
    study = write_phantom_series(tmp_path / "mr", "normal", n_slices=20, size=32, seed=0)
    for path in study.paths:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    stored = store(sqlite_url, list(study.paths))
    with pytest.raises(NoUsableSeries, match="modality MR"):
        _select(sqlite_url, tmp_path, stored.study_version_id)  # type: ignore[attr-defined]


def test_rules_toml_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        '[[filters]]\nattribute = "slice_count"\nmin = 50\n'
        '[[preferences]]\nattribute = "slice_count"\nprefer = "lowest"\n'
    )
    rules = load_rules(path)
    index, _ = choose([_cand(series_instance_uid="1", slice_count=40),
                       _cand(series_instance_uid="2", slice_count=60),
                       _cand(series_instance_uid="3", slice_count=90)], rules)
    assert index == 1
    with pytest.raises(RulesError, match=r"filters\[0\].attribute"):
        rules_from_mapping({"filters": [{"attribute": "patient_name", "in": ["X"]}]})
    with pytest.raises(RulesError, match=r"filters\[0\] needs"):
        rules_from_mapping({"filters": [{"attribute": "modality", "in": ["CT"], "min": 1}]})
    with pytest.raises(RulesError, match=r"preferences\[0\]"):
        rules_from_mapping({"preferences": [{"attribute": "slice_count", "prefer": "most"}]})
    with pytest.raises(RulesError, match="unknown keys"):
        rules_from_mapping({"filter": []})
