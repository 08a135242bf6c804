"""A real scanner series (JPEG Lossless, ../shared/data) sent by dcmtk's storescu."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from ctdx.db.models import Instance, Study, VersionState
from ctdx.db.session import session_scope
from tests.conftest import require_tool
from tests.scp.conftest import Running, wait_for

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


@pytest.mark.shared_data
@pytest.mark.dcmtk
def test_storescu_sends_a_real_jpeg_lossless_series(
    scp: Running, shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storescu = require_tool("storescu")
    series = shared_data / "covid-ct-md" / "COVID-19" / "P001"
    files = sorted(series.glob("*.dcm"))
    result = subprocess.run(
        [storescu, "-xs", "-aet", "SCANNER", "-aec", "CTDX", "+sd", "127.0.0.1",
         str(scp.port), str(series)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Store Failed" not in result.stderr + result.stdout

    with session_scope(scp.engine) as s:
        rows = list(s.scalars(select(Instance)))
        study = s.scalars(select(Study)).one()
    assert len(rows) == len(files) == 148
    assert {r.transfer_syntax_uid for r in rows} == {JPEG_LOSSLESS_SV1}
    assert {r.calling_ae_title for r in rows} == {"SCANNER"}
    source = pydicom.dcmread(files[0])
    (row,) = [r for r in rows if r.sop_instance_uid == source.SOPInstanceUID]
    stored = pydicom.dcmread(scp.spool / row.path)
    assert stored.PixelData == source.PixelData  # compressed bytes as they came
    assert study.study_instance_uid == source.StudyInstanceUID
    wait_for(lambda: scp.versions()[0].state == VersionState.QUEUED, timeout=30,
             message="complete after the quiet period and queued")
    assert scp.versions()[0].instance_count == 148
    # the real patient's ID and name never reach the log
    assert str(source.PatientID) not in caplog.text
