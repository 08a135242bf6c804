"""The optional outputs: the Secondary Capture summary image and the Key Object Selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage
from sqlalchemy import Engine

from ctdx.db.session import session_scope
from ctdx.worker.report.inputs import load_report_input
from ctdx.worker.report.summary import result_lines
from tests.report.conftest import AnalysedStudy
from tests.report.test_sr import build


def test_key_object_selection_points_at_the_key_slices(
    report_engine: Engine, data_dir: Path, analysed: AnalysedStudy
) -> None:
    ko = pydicom.dcmread(build(report_engine, data_dir, analysed.analysis_id, "ko")["ko"])
    assert ko.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert ko.StudyInstanceUID == analysed.study_instance_uid
    assert ko.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    images = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in ko.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    assert images == [analysed.sop_instance_uids[i] for i in (9, 8, 7)]
    [description] = [
        item.TextValue
        for item in ko.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "113012"  # Key Object Description
    ]
    assert "unverified" in description and "not a diagnosis" in description


def test_summary_image_burns_in_the_result_but_no_patient_data(
    report_engine: Engine, data_dir: Path, analysed: AnalysedStudy
) -> None:
    sc = pydicom.dcmread(build(report_engine, data_dir, analysed.analysis_id, "sc")["sc"])
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == analysed.study_instance_uid
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    pixels = sc.pixel_array
    assert pixels.shape[1] == 512 and pixels.shape[2] == 3
    band = pixels[:100]
    assert int(np.count_nonzero((band[..., 0] > 200) & (band[..., 1] > 150))) > 500  # yellow text
    with session_scope(report_engine) as s:
        inp = load_report_input(s, analysed.analysis_id)
    lines = result_lines(inp, inp.key_slices[0])
    assert lines[0].endswith("NOT A DIAGNOSIS")
    assert lines[1] == "Study call: COVID-19"
    assert "p(COVID-19) = 0.88" in lines[3]
    assert not any("PHANTOM" in line for line in lines)  # the patient's name is never burned in


def test_summary_draws_the_lung_contour(
    report_engine: Engine, data_dir: Path, analysed: AnalysedStudy
) -> None:
    pytest.importorskip("ctdx.model_train.method.segmentation")
    sc = pydicom.dcmread(build(report_engine, data_dir, analysed.analysis_id, "sc")["sc"])
    image = sc.pixel_array[200:]  # below the text band
    green = (image[..., 1] > 150) & (image[..., 0] < 80) & (image[..., 2] < 80)
    assert int(np.count_nonzero(green)) > 200
