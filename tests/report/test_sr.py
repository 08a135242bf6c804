"""The SR built from an analysis: content, codes, strict round trip, dcmtk and dicom3tools."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.config import settings as pydicom_settings
from pydicom.uid import Comprehensive3DSRStorage
from sqlalchemy import Engine, update

from ctdx.db.models import Analysis, AnalysisState
from ctdx.db.session import session_scope
from ctdx.worker.report import AnalysisNotReportable, SourceImageMissing, codes
from ctdx.worker.report.outbox import StoredObject
from ctdx.worker.report.publish import build_objects
from ctdx.worker.report.uids import object_uids
from tests.report.conftest import (
    MODEL_UID,
    AnalysedStudy,
    add_analysis,
    dciodvfy,
    dsrdump,
    settings_for,
)

#: dciodvfy warnings that are expected, with the reason (also in docs/sr-content.md).
JUSTIFIED_WARNINGS = {
    # ctdx's private coding scheme (PS3.16 8.2: designators starting "99" are private); it is
    # identified in the Coding Scheme Identification Sequence of every SR.
    r"Unrecognized defined term <99CTDX> for value 1 of attribute <Coding Scheme Designator>",
}


@pytest.fixture
def strict() -> Iterator[None]:
    """pydicom raises on any value that does not conform, reading and writing."""
    reading, writing = (
        pydicom_settings.reading_validation_mode,
        pydicom_settings.writing_validation_mode,
    )
    pydicom_settings.reading_validation_mode = pydicom.config.RAISE
    pydicom_settings.writing_validation_mode = pydicom.config.RAISE
    yield
    pydicom_settings.reading_validation_mode = reading
    pydicom_settings.writing_validation_mode = writing


def build(engine: Engine, data_dir: Path, analysis_id: int, outputs: str = "sr") -> dict[str, Path]:
    objects: list[StoredObject] = build_objects(
        engine, analysis_id, settings_for(data_dir, report_outputs=outputs)
    )
    return {obj.kind: data_dir / obj.path for obj in objects}


def items(sr: hd.sr.Comprehensive3DSR, name: hd.sr.CodedConcept) -> list[pydicom.Dataset]:
    return hd.sr.utils.find_content_items(sr, name=name, recursive=True)


def numeric(sr: hd.sr.Comprehensive3DSR, name: hd.sr.CodedConcept) -> list[float]:
    return [float(i.MeasuredValueSequence[0].NumericValue) for i in items(sr, name)]


def test_sr_states_the_analysis_and_survives_a_strict_round_trip(
    report_engine: Engine, data_dir: Path, analysed: AnalysedStudy, strict: None
) -> None:
    path = build(report_engine, data_dir, analysed.analysis_id)["sr"]
    ds = pydicom.dcmread(path)  # strict reading: raises on any invalid value
    pydicom.dcmread(pydicom.filebase.DicomBytesIO(path.read_bytes()))
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)

    # filed in the original study, patient copied, in its own series
    source = pydicom.dcmread(analysed.image_paths[0], stop_before_pixels=True)
    assert ds.SOPClassUID == Comprehensive3DSRStorage
    assert ds.StudyInstanceUID == analysed.study_instance_uid
    assert (ds.PatientID, ds.PatientName, ds.AccessionNumber) == (
        source.PatientID,
        source.PatientName,
        source.AccessionNumber,
    )
    assert ds.SeriesInstanceUID not in (analysed.series_instance_uid,)
    assert "not a diagnosis" in ds.SeriesDescription and "AI-generated" in ds.SeriesDescription
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence] == ["99CTDX"]
    # every analysed image is listed as evidence
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == set(analysed.sop_instance_uids)

    # the study call, coded, twice: Finding of the group and Impression
    findings = [
        i.ConceptCodeSequence[0].CodeValue
        for i in items(sr, hd.sr.CodedConcept("121071", "DCM", "Finding"))
    ]
    assert findings[0] == codes.COVID19.value  # the study-call group comes first
    impression = items(sr, codes.IMPRESSION)
    assert [i.ConceptCodeSequence[0].CodeValue for i in impression] == ["840539006"]
    # shares (conftest: 7 of 10 analysed slices are COVID-19), threshold, counts
    assert numeric(sr, codes.SHARE_COVID19) == [70.0]
    assert numeric(sr, codes.SHARE_NORMAL) == [30.0]
    assert numeric(sr, codes.SHARE_OTHER_PNEUMONIA) == [0.0]
    assert numeric(sr, codes.THRESHOLD_VALUE) == [5.0]
    assert numeric(sr, codes.SLICES_TOTAL) == [12]
    assert numeric(sr, codes.SLICES_ANALYSED) == [10]
    assert numeric(sr, codes.SLICES_SKIPPED) == [2]
    # manifestations among the 7 COVID-19 slices (conftest: index % 3 over indices 3..9)
    assert sorted(numeric(sr, codes.SLICES_WITH_MANIFESTATION)) == [2, 2, 3]
    assert sum(numeric(sr, codes.SHARE_WITH_MANIFESTATION)) == pytest.approx(100.0, abs=0.01)
    # key slices: the three most confident COVID-19 slices (p grows with the index: 9, 8, 7)
    probabilities = items(sr, codes.SLICE_PROBABILITY_COVID19)
    referenced = [
        p.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for p in probabilities
    ]
    assert referenced == [analysed.sop_instance_uids[i] for i in (9, 8, 7)]
    assert numeric(sr, codes.SLICE_PROBABILITY_COVID19) == [0.88, 0.86, 0.84]
    library = items(sr, hd.sr.CodedConcept("111028", "DCM", "Image Library"))
    assert len(library) == 1
    # algorithm identification: name, version, and the model UID as device and parameter
    names = [i.TextValue for i in items(sr, hd.sr.CodedConcept("111001", "DCM", "Algorithm Name"))]
    assert names[0] == "ctdx-resnet50"
    parameters = [
        i.TextValue for i in items(sr, hd.sr.CodedConcept("111002", "DCM", "Algorithm Parameters"))
    ]
    assert f"model_uid={MODEL_UID}" in parameters
    assert "inference: cpu (2 threads), int8 x86 (agreement 0.998), channels-last, torch 2.14.1" \
        in parameters  # how the networks ran: precision is part of what produced the call
    device = items(sr, hd.sr.CodedConcept("121012", "DCM", "Device Observer UID"))
    assert device[0].UID == MODEL_UID


def test_sop_instance_uid_is_derived_from_study_version_and_model(
    report_engine: Engine, data_dir: Path, analysed: AnalysedStudy
) -> None:
    first = pydicom.dcmread(build(report_engine, data_dir, analysed.analysis_id)["sr"])
    second = pydicom.dcmread(build(report_engine, data_dir, analysed.analysis_id)["sr"])
    expected = object_uids(analysed.study_instance_uid, 1, MODEL_UID, "sr")
    assert first.SOPInstanceUID == second.SOPInstanceUID == expected.sop_instance_uid
    assert first.SeriesInstanceUID == expected.series_instance_uid
    assert first.ContentSequence == second.ContentSequence
    other_model = object_uids(analysed.study_instance_uid, 1, MODEL_UID + ".2", "sr")
    other_version = object_uids(analysed.study_instance_uid, 2, MODEL_UID, "sr")
    assert (
        len(
            {
                expected.sop_instance_uid,
                other_model.sop_instance_uid,
                other_version.sop_instance_uid,
            }
        )
        == 3
    )


@pytest.mark.dcmtk
def test_dsrdump_parses_and_dciodvfy_finds_no_errors(
    report_engine: Engine, data_dir: Path, analysed: AnalysedStudy
) -> None:
    paths = build(report_engine, data_dir, analysed.analysis_id, outputs="sr,sc,ko")
    tree = dsrdump(paths["sr"])
    assert "Comprehensive 3D SR" in tree and "Verification Flag   : UNVERIFIED" in tree
    assert '(840539006,SCT,"COVID-19")' in tree
    for kind, path in paths.items():
        errors, warnings = dciodvfy(path)
        assert errors == [], (kind, errors)
        unexplained = [w for w in warnings if not any(re.search(p, w) for p in JUSTIFIED_WARNINGS)]
        assert unexplained == [], (kind, unexplained)


def test_demo_model_says_so(report_engine: Engine, data_dir: Path) -> None:
    study = add_analysis(report_engine, data_dir, model_name="ctdx synthetic demo model")
    ds = pydicom.dcmread(build(report_engine, data_dir, study.analysis_id)["sr"])
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    assert "DEMO synthetic model" in ds.SeriesDescription
    names = [i.TextValue for i in items(sr, hd.sr.CodedConcept("111001", "DCM", "Algorithm Name"))]
    assert names[0].endswith("[synthetic demo model]")


def test_normal_study_is_called_normal_without_key_slices(
    report_engine: Engine, data_dir: Path
) -> None:
    study = add_analysis(report_engine, data_dir, kind="normal", manifestations=False)
    paths = build(report_engine, data_dir, study.analysis_id, outputs="sr,sc,ko")
    assert set(paths) == {"sr", "sc"}  # no key slices: no key object selection
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(paths["sr"]))
    impression = items(sr, codes.IMPRESSION)
    assert impression[0].ConceptCodeSequence[0].CodeValue == codes.NORMAL.value
    assert numeric(sr, codes.SHARE_COVID19) == [0.0]
    assert items(sr, codes.SLICE_PROBABILITY_COVID19) == []
    assert items(sr, codes.SLICES_WITH_MANIFESTATION) == []  # no manifestation model ran


def test_reanalysed_study_version_replaces_the_earlier_sr(
    report_engine: Engine, data_dir: Path, analysed: AnalysedStudy
) -> None:
    first = pydicom.dcmread(build(report_engine, data_dir, analysed.analysis_id)["sr"])
    later = add_analysis(report_engine, data_dir, study_instance_uid=analysed.study_instance_uid)
    assert later.study_version == 2
    second = pydicom.dcmread(build(report_engine, data_dir, later.analysis_id)["sr"])
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.StudyInstanceUID == first.StudyInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID  # one SR series per model
    assert second.InstanceNumber == 2
    predecessor = second.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == analysed.study_instance_uid
    refs = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [first.SOPInstanceUID]
    assert "PredecessorDocumentsSequence" not in first


def test_no_report_for_an_analysis_without_result(
    report_engine: Engine, data_dir: Path, analysed: AnalysedStudy
) -> None:
    with session_scope(report_engine) as s:
        s.execute(
            update(Analysis)
            .where(Analysis.id == analysed.analysis_id)
            .values(state=AnalysisState.FAILED, decision=None)
        )
    with pytest.raises(AnalysisNotReportable, match="failed"):
        build(report_engine, data_dir, analysed.analysis_id)
    with pytest.raises(AnalysisNotReportable, match="does not exist"):
        build(report_engine, data_dir, 9999)


def test_missing_source_image_is_a_report_error(
    report_engine: Engine, data_dir: Path, analysed: AnalysedStudy
) -> None:
    analysed.image_paths[9].unlink()  # the first key slice
    with pytest.raises(SourceImageMissing, match=analysed.sop_instance_uids[9]):
        build(report_engine, data_dir, analysed.analysis_id)


def test_every_code_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "sr-content.md").read_text()
    for name, code in codes.all_codes().items():
        row = f"| `{name}` | {code.value} | {code.scheme_designator} | {code.meaning} |"
        assert row in doc, row
