"""Orthanc (Debian package) as a real PACS: the report objects land in the study of the images."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from ctdx.db.models import Export, ExportState, utcnow
from ctdx.db.session import session_scope
from ctdx.worker.report import deliver_due, publish_reports
from ctdx.worker.report.outbox import list_exports
from tests.conftest import require_tool
from tests.report.conftest import AnalysedStudy, settings_for
from tests.report.orthanc_support import Orthanc


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


@pytest.mark.dcmtk
def test_orthanc_files_the_reports_in_the_study_of_the_images_once(
    report_engine: Engine, data_dir: Path, analysed: AnalysedStudy, orthanc: Orthanc
) -> None:
    # the scanner's images reach the PACS first
    storescu = require_tool("storescu")
    subprocess.run(
        [storescu, "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port)]
        + [str(p) for p in analysed.image_paths],
        check=True,
        capture_output=True,
        timeout=120,
    )
    settings = settings_for(
        data_dir,
        pacs_ae_title="ORTHANC",
        pacs_host="127.0.0.1",
        pacs_port=orthanc.dicom_port,
        report_outputs="sr,sc,ko",
    )
    publish_reports(report_engine, analysed.analysis_id, settings)
    with session_scope(report_engine) as s:
        sent = {e.kind: e for e in list_exports(s)}
    assert {k: e.state for k, e in sent.items()} == {
        "sr": "delivered",
        "sc": "delivered",
        "ko": "delivered",
    }

    [study_id] = orthanc.get("/studies")
    study = orthanc.get(f"/studies/{study_id}")
    assert study["MainDicomTags"]["StudyInstanceUID"] == analysed.study_instance_uid
    series = orthanc.get(f"/studies/{study_id}/series")
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
    assert modalities == ["CT", "KO", "OT", "SR"]
    [sr_series] = [s for s in series if s["MainDicomTags"]["Modality"] == "SR"]
    assert "not a diagnosis" in sr_series["MainDicomTags"]["SeriesDescription"]
    [sr_instance] = orthanc.get(f"/series/{sr_series['ID']}/instances")
    assert sr_instance["MainDicomTags"]["SOPInstanceUID"] == sent["sr"].sop_instance_uid
    before = orthanc.get("/statistics")["CountInstances"]
    assert before == len(analysed.image_paths) + 3

    # a second delivery of the same objects is a duplicate, not a second report
    with session_scope(report_engine) as s:
        s.execute(update(Export).values(state=ExportState.PENDING, next_attempt_at=utcnow()))
    assert deliver_due(report_engine, settings) == 3
    with session_scope(report_engine) as s:
        assert {(e.state, e.attempts) for e in list_exports(s)} == {("delivered", 2)}
    assert orthanc.get("/statistics")["CountInstances"] == before
    assert len(orthanc.get(f"/series/{sr_series['ID']}/instances")) == 1
    assert len(orthanc.get("/studies")) == 1
