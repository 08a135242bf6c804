"""A real scanner series (COVID-CT-MD P001, JPEG Lossless) through the report and to storescp.

Real headers carry what phantoms do not (vendor tags, de-identified patient
module, compressed pixel data); the SR, summary image and key object
selection must still be valid and reach the PACS in the original study.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.config import settings as pydicom_settings
from sqlalchemy import Engine

from ctdx.db.session import session_scope
from ctdx.worker.report import publish_reports
from ctdx.worker.report.outbox import list_exports
from tests.conftest import wait_for
from tests.report.conftest import StoreSCP, dciodvfy, dsrdump, record_analysis, settings_for
from tests.report.test_sr import JUSTIFIED_WARNINGS


@pytest.mark.dcmtk
@pytest.mark.shared_data
def test_real_covid_series_ends_with_valid_reports_in_the_pacs(
    shared_data: Path,
    report_engine: Engine,
    data_dir: Path,
    storescp: Callable[[], StoreSCP],
) -> None:
    root = shared_data / "covid-ct-md"
    with (root / "slice_labels.csv").open() as fh:
        rows = sorted(
            (r for r in csv.DictReader(fh) if r["subject"] == "P001"),
            key=lambda r: int(r["slice_index_head_to_feet"]),
        )
    spool_series = data_dir / "spool" / "P001"
    spool_series.mkdir(parents=True)
    paths = []
    for row in rows:  # symlinked into the spool: never copied
        link = spool_series / Path(row["file"]).name
        link.symlink_to(root / row["file"])
        paths.append(link)
    study = record_analysis(
        report_engine, data_dir, paths, lesions=[r["infection"] == "1" for r in rows]
    )
    pacs = storescp()
    pacs.start()
    settings = settings_for(
        data_dir, pacs_host="127.0.0.1", pacs_port=pacs.port, report_outputs="sr,sc,ko"
    )
    publish_reports(report_engine, study.analysis_id, settings)

    received = wait_for(
        lambda: (files := pacs.files()) and len(files) == 3 and files,
        timeout=60,
        message="SR, summary and key objects at storescp",
    )
    assert isinstance(received, list)
    with session_scope(report_engine) as s:
        assert {e.state for e in list_exports(s)} == {"delivered"}
    reading = pydicom_settings.reading_validation_mode
    pydicom_settings.reading_validation_mode = pydicom.config.RAISE
    try:
        for path in received:
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == study.study_instance_uid
            assert ds.PatientID == pydicom.dcmread(paths[0], stop_before_pixels=True).PatientID
            errors, warnings = dciodvfy(path)
            assert errors == [], (ds.Modality, errors)
            assert [
                w for w in warnings if not any(re.search(p, w) for p in JUSTIFIED_WARNINGS)
            ] == [], ds.Modality
            if ds.Modality == "SR":
                assert '(840539006,SCT,"COVID-19")' in dsrdump(path)
            if ds.Modality == "OT":
                assert ds.pixel_array.shape[2] == 3 and ds.BurnedInAnnotation == "YES"
    finally:
        pydicom_settings.reading_validation_mode = reading
