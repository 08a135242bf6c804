"""MPPS (N-CREATE / N-SET): a COMPLETED step whose instances are all here completes at once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from ctdx.db.models import VersionState
from ctdx.model_train.phantom import PhantomStudy
from tests.scp.conftest import Running, associate, chunked_send, phantom, status_of, wait_for


def _create(study_uid: str, status: str = "IN PROGRESS") -> Dataset:
    ds = Dataset()
    ds.PatientName = "PHANTOM^SYNTHETIC"  # PHI-like: must never reach the logs
    ds.PatientID = "PHANTOM-0001"
    step = Dataset()
    step.StudyInstanceUID = study_uid
    ds.ScheduledStepAttributesSequence = DicomSequence([step])
    ds.PerformedProcedureStepStatus = status
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = DicomSequence([])
    return ds


def _completed(sops: Sequence[str], series_uid: str, status: str = "COMPLETED") -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    refs = []
    for sop in sops:
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ref.ReferencedSOPInstanceUID = sop
        refs.append(ref)
    series.ReferencedImageSequence = DicomSequence(refs)
    ds.PerformedSeriesSequence = DicomSequence([series])
    return ds


def _store(assoc: Association, study: PhantomStudy, indices: Sequence[int]) -> None:
    for i in indices:
        assert status_of(assoc.send_c_store(study.paths[i])) == 0x0000


def test_completed_step_completes_at_once_while_association_is_open(
    start_scp: Callable[..., Running], tmp_path: Path
) -> None:
    scp = start_scp(quiet_seconds=600)  # only MPPS can complete it within the test
    study = phantom(tmp_path, n_slices=3)
    mpps_uid = generate_uid()
    with chunked_send(), associate(scp.port, [ExplicitVRLittleEndian]) as assoc:
        status, _ = assoc.send_n_create(
            _create(study.study_instance_uid), ModalityPerformedProcedureStep, mpps_uid
        )
        assert status.Status == 0x0000
        _store(assoc, study, range(3))
        status, _ = assoc.send_n_set(
            _completed(study.sop_instance_uids, study.series_instance_uid),
            ModalityPerformedProcedureStep, mpps_uid,
        )
        assert status.Status == 0x0000
        (version,) = scp.versions()
        assert version.state != VersionState.RECEIVING  # before the association ends
        assert version.completion_reason == "mpps"
    wait_for(lambda: scp.sender.sent, timeout=20, message="queued")
    assert scp.sender.sent == [version.id]


def test_completed_step_waits_for_its_last_instance(
    start_scp_sqlite: Callable[..., Running], tmp_path: Path
) -> None:
    scp = start_scp_sqlite(quiet_seconds=600)
    study = phantom(tmp_path, n_slices=3)
    mpps_uid = generate_uid()
    with chunked_send(), associate(scp.port, [ExplicitVRLittleEndian]) as assoc:
        assert assoc.send_n_create(
            _create(study.study_instance_uid), ModalityPerformedProcedureStep, mpps_uid
        )[0].Status == 0x0000
        _store(assoc, study, [0, 1])
        assert assoc.send_n_set(
            _completed(study.sop_instance_uids, study.series_instance_uid),
            ModalityPerformedProcedureStep, mpps_uid,
        )[0].Status == 0x0000
        assert scp.versions()[0].state == VersionState.RECEIVING  # one instance is missing
        _store(assoc, study, [2])
        wait_for(lambda: scp.versions()[0].state != VersionState.RECEIVING, timeout=10,
                 message="completed by MPPS once the last instance arrived")
    (version,) = scp.versions()
    assert (version.completion_reason, version.instance_count) == ("mpps", 3)


def test_mpps_protocol_errors_are_answered(scp_sqlite: Running, tmp_path: Path) -> None:
    study_uid = generate_uid()
    uid = generate_uid()
    with associate(scp_sqlite.port) as assoc:
        assert assoc.send_n_create(_create(study_uid), ModalityPerformedProcedureStep,
                                   uid)[0].Status == 0x0000
        # the same step twice
        assert assoc.send_n_create(_create(study_uid), ModalityPerformedProcedureStep,
                                   uid)[0].Status == 0x0111
        # a new step must start IN PROGRESS
        status, _ = assoc.send_n_create(_create(study_uid, "COMPLETED"),
                                        ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0106
        # a step nobody created
        assert assoc.send_n_set(_completed([], "1.2.3"), ModalityPerformedProcedureStep,
                                generate_uid())[0].Status == 0x0112
        # DISCONTINUED is final: no further change
        assert assoc.send_n_set(_completed([], "1.2.3", "DISCONTINUED"),
                                ModalityPerformedProcedureStep, uid)[0].Status == 0x0000
        assert assoc.send_n_set(_completed([], "1.2.3"), ModalityPerformedProcedureStep,
                                uid)[0].Status == 0x0110
    assert scp_sqlite.versions() == []


def test_step_attributes_with_patient_data_are_not_logged(
    scp_sqlite: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with associate(scp_sqlite.port) as assoc:
        assert assoc.send_n_create(_create(generate_uid()), ModalityPerformedProcedureStep,
                                   generate_uid())[0].Status == 0x0000
    assert "MPPS" in caplog.text
    assert "PHANTOM" not in caplog.text and "SYNTHETIC" not in caplog.text
