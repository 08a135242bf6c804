"""Reports of an Enhanced CT study: key slices are frames, referenced with their frame numbers.

The analysis is recorded like the classic one of ``conftest.add_analysis`` (same
phantom, same calls per slice), but the series is one Enhanced CT instance whose
frames are stored in a shuffled order: slice ``i`` is frame ``ORDER.index(i) + 1``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from ctdx.db.session import session_scope
from ctdx.model_train.phantom import phantom_labels, write_enhanced_phantom
from ctdx.worker.report.inputs import load_report_input
from ctdx.worker.report.summary import result_lines
from tests.report.conftest import AnalysedStudy, add_analysis, dciodvfy, dsrdump, record_analysis
from tests.report.test_sr import JUSTIFIED_WARNINGS, build

N, SIZE = 12, 64
ORDER = list(range(N))
random.Random(7).shuffle(ORDER)
KEY = (9, 8, 7)  # the key slices of the recorded analysis, most confident first


def frame_of(slice_index: int) -> int:
    return ORDER.index(slice_index) + 1


@pytest.fixture
def enhanced(report_engine: Engine, data_dir: Path) -> AnalysedStudy:
    study_uid = str(generate_uid())
    out = data_dir / "spool" / study_uid / f"series-{generate_uid()}"
    phantom = write_enhanced_phantom(out, "covid19", n_slices=N, size=SIZE, seed=3,
                                     frame_order=ORDER, per_frame_rescale=True,
                                     study_instance_uid=study_uid)
    return record_analysis(
        report_engine, data_dir, [phantom.paths[0]] * N,
        lesions=list(phantom_labels("covid19", N)),
        frame_numbers=[frame_of(i) for i in range(N)],
    )


def _image_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "IMAGE":
            found.append(item)
        found.extend(_image_items(item))
    return found


def _frames(item: pydicom.Dataset) -> list[int]:
    value = item.ReferencedSOPSequence[0].get("ReferencedFrameNumber")
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, pydicom.multival.MultiValue) \
        else [int(value)]


def test_sr_references_the_key_frames_and_describes_their_position(
    report_engine: Engine, data_dir: Path, enhanced: AnalysedStudy
) -> None:
    sr = pydicom.dcmread(build(report_engine, data_dir, enhanced.analysis_id)["sr"])
    [sop] = set(enhanced.sop_instance_uids)
    images = _image_items(sr)
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images} == {sop}
    library = [i for i in images if i.ConceptNameCodeSequence[0].CodeMeaning == "Source"]
    sources = [i for i in images if i not in library]
    expected = [[frame_of(i)] for i in KEY]
    assert [_frames(i) for i in library] == expected
    assert [_frames(i) for i in sources] == expected  # Source of Measurement of each key slice
    for item, index in zip(library, KEY, strict=True):
        # the Image Library entry describes that frame: phantom slice i lies at z = -2 i mm
        [z] = [float(d.MeasuredValueSequence[0].NumericValue) for d in item.ContentSequence
               if d.ConceptNameCodeSequence[0].CodeValue == "110903"]  # Image Position Z
        assert z == -2.0 * index
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    [series] = evidence.ReferencedSeriesSequence
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence] == [sop]


def test_key_objects_list_the_key_frames_of_the_instance(
    report_engine: Engine, data_dir: Path, enhanced: AnalysedStudy
) -> None:
    ko = pydicom.dcmread(build(report_engine, data_dir, enhanced.analysis_id, "ko")["ko"])
    [image] = [item for item in ko.ContentSequence if item.ValueType == "IMAGE"]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        enhanced.sop_instance_uids[0]
    assert _frames(image) == [frame_of(i) for i in KEY]


def test_summary_shows_the_key_frame(
    report_engine: Engine, data_dir: Path, enhanced: AnalysedStudy
) -> None:
    """The summary of the enhanced study shows the same image as that of the classic one."""
    sc = pydicom.dcmread(build(report_engine, data_dir, enhanced.analysis_id, "sc")["sc"])
    classic = add_analysis(report_engine, data_dir, n_slices=N, size=SIZE)
    reference = pydicom.dcmread(build(report_engine, data_dir, classic.analysis_id, "sc")["sc"])
    a, b = sc.pixel_array, reference.pixel_array
    assert a.shape == b.shape
    image_rows = slice(a.shape[0] - a.shape[1], a.shape[0])  # the square image under the band
    np.testing.assert_array_equal(a[image_rows], b[image_rows])
    # and not merely any frame: the frame stored first is another slice
    assert frame_of(KEY[0]) != 1
    with session_scope(report_engine) as session:
        inp = load_report_input(session, enhanced.analysis_id)
    assert result_lines(inp, inp.key_slices[0])[3].startswith(
        f"Key slice {KEY[0] + 1} of {N} (frame {frame_of(KEY[0])}): p(COVID-19) = ")


@pytest.mark.dcmtk
def test_enhanced_study_reports_parse_and_validate(
    report_engine: Engine, data_dir: Path, enhanced: AnalysedStudy
) -> None:
    paths = build(report_engine, data_dir, enhanced.analysis_id, outputs="sr,sc,ko")
    tree = dsrdump(paths["sr"])
    assert '(840539006,SCT,"COVID-19")' in tree
    for index in KEY:  # dcmtk shows each image reference as (SOP class, UID, frames)
        assert f"(CTe image,,{frame_of(index)})" in tree
    for kind, path in paths.items():
        errors, warnings = dciodvfy(path)
        assert errors == [], (kind, errors)
        unexplained = [w for w in warnings if not any(re.search(p, w) for p in JUSTIFIED_WARNINGS)]
        assert unexplained == [], (kind, unexplained)
