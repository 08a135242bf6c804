"""The DICOM Structured Report: a Comprehensive 3D SR with a TID 1500 Measurement Report.

Built from highdicom's templates only; every code comes from
:mod:`ctdx.worker.report.codes`. The content tree (docs/sr-content.md)::

    Imaging Measurement Report (TID 1500)
    ├─ language, observer = the model as a device, procedure = CT
    ├─ Image Library: the key slices
    └─ Imaging Measurements
       ├─ group "Study call" (TID 1501): Finding = COVID-19 | Pneumonia | Normal,
       │    Impression = same, shares of slices per class (%), threshold (%),
       │    slice counts (total, analysed, skipped), algorithm identification
       ├─ one group per manifestation (when a manifestation model ran):
       │    count and share of COVID-19 slices showing it
       └─ one group per key slice: slice probability of COVID-19, with the image
            as Source of Measurement and the slice's manifestation

A key slice of an Enhanced CT series is a frame: every reference to it (Image
Library entry, Source of Measurement) carries its Referenced Frame Number, and
the Image Library describes the frame's own position (:mod:`ctdx.worker.report.frames`).

Flags are honest: the document is COMPLETE (it holds everything this analysis
produced; a later study version gets a new document that names this one as
predecessor), UNVERIFIED (no person checked it) and PRELIMINARY (it is a
second reader's output, not the definitive report). The series description
says "AI-generated, auxiliary, not a diagnosis"; for the synthetic demo model
it says so instead.

The document is deterministic for an analysis: its UIDs derive from (study,
version, model) and its dates from the analysis' finish time, so rebuilding it
gives the same SOP Instance.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes as dicom_codes

from ctdx.worker.report import codes
from ctdx.worker.report.frames import set_frame_numbers
from ctdx.worker.report.inputs import ReportInput, SliceInfo
from ctdx.worker.report.uids import SERIES_NUMBERS, derived_uid, device_uid, object_uids

logger = logging.getLogger(__name__)

MANUFACTURER = "ctdx"
#: Series Description (LO, at most 64 characters) of every ctdx object.
SERIES_DESCRIPTION = "AI-generated (ctdx), auxiliary use, not a diagnosis"
DEMO_SERIES_DESCRIPTION = "DEMO synthetic model (ctdx): no clinical meaning"


@dataclass(frozen=True)
class SrSources:
    """Headers the SR copies from or references (read from the spool by the caller)."""

    source: Dataset  # one analysed image: patient and study modules are copied from it
    # headers of the key slices, in key-slice order; a frame's is its view
    # (worker.report.frames.frame_view): the frame's position at the top level
    key_images: Sequence[Dataset]
    predecessor: Dataset | None = None  # the SR this one replaces (an earlier study version)


def software_version() -> str:
    try:
        return f"ctdx {version('ctdx')}"
    except PackageNotFoundError:
        return "ctdx (unpackaged)"


def series_description(inp: ReportInput) -> str:
    return DEMO_SERIES_DESCRIPTION if inp.is_demo_model else SERIES_DESCRIPTION


def local_datetime(moment: datetime) -> datetime:
    """DICOM dates and times are local, like the study's own."""
    return moment.astimezone()


def _percent(share: float) -> float:
    return round(100.0 * share, 3)


def algorithm(inp: ReportInput) -> hd.sr.AlgorithmIdentification:
    """The recognition model (TID 4019): name, version, UID and the decision parameters."""
    name = inp.model_name + (" [synthetic demo model]" if inp.is_demo_model else "")
    return hd.sr.AlgorithmIdentification(
        name=name,
        version=inp.model_version,
        parameters=[
            f"model_uid={inp.model_uid}",
            f"covid_threshold={inp.threshold:g} (share of analysed slices)",
            "study call: COVID-19 when the share of analysed slices classified COVID-19 "
            "is above the threshold (Chen et al. 2021)",
            *([f"inference: {inp.device}"] if inp.device else []),
            *([inp.operating_point] if inp.operating_point else []),
        ],
        manufacturer=MANUFACTURER,
    )


def manifestation_algorithm(inp: ReportInput) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=f"{inp.model_name} manifestation classifier",
        version=inp.model_version,
        parameters=[f"manifestation_model_uid={inp.manifestation_model_uid}"],
        manufacturer=MANUFACTURER,
    )


def _lung() -> list[hd.sr.FindingSite]:
    return [hd.sr.FindingSite(anatomic_location=codes.LUNG)]


def _tracking(sop_instance_uid: str, label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=derived_uid(sop_instance_uid, label), identifier=label)


def _measurement(name: CodedConcept, value: float, unit: CodedConcept) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=value, unit=unit)


def study_call_group(
    inp: ReportInput, sop_instance_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    call = codes.DECISION_CODES[inp.decision]
    measurements = [
        _measurement(codes.SHARE_CODES[name], _percent(inp.fractions[name]), codes.PERCENT)
        for name in ("covid19", "other_pneumonia", "normal")
    ]
    measurements += [
        _measurement(codes.THRESHOLD_VALUE, _percent(inp.threshold), codes.PERCENT),
        _measurement(codes.SLICES_TOTAL, inp.slices_total, codes.SLICES),
        _measurement(codes.SLICES_ANALYSED, inp.slices_analysed, codes.SLICES),
        _measurement(codes.SLICES_SKIPPED, inp.slices_skipped, codes.SLICES),
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop_instance_uid, "Study call"),
        finding_type=call,
        finding_sites=_lung(),
        algorithm_id=algorithm(inp),
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.IMPRESSION, value=call)],
    )


def manifestation_groups(
    inp: ReportInput, sop_instance_uid: str
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    counts = inp.manifestation_counts
    if counts is None:
        return []
    covid = len(inp.covid_slices)
    groups = []
    for name, code in codes.MANIFESTATION_CODES.items():
        count = counts[name]
        measurements = [_measurement(codes.SLICES_WITH_MANIFESTATION, count, codes.SLICES)]
        if covid:
            measurements.append(
                _measurement(codes.SHARE_WITH_MANIFESTATION, _percent(count / covid), codes.PERCENT)
            )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(sop_instance_uid, f"Manifestation: {code.meaning}"),
                finding_type=code,
                finding_sites=_lung(),
                algorithm_id=manifestation_algorithm(inp),
                measurements=measurements,
            )
        )
    return groups


def key_slice_groups(
    inp: ReportInput, sop_instance_uid: str
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    groups = []
    for rank, sl in enumerate(inp.key_slices, start=1):
        probability = hd.sr.Measurement(
            name=codes.SLICE_PROBABILITY_COVID19,
            value=round(sl.p_covid19 or 0.0, 4),
            unit=codes.NO_UNITS,
            referenced_images=[
                hd.sr.SourceImageForMeasurement(
                    referenced_sop_class_uid=sl.sop_class_uid,
                    referenced_sop_instance_uid=sl.sop_instance_uid,
                    referenced_frame_numbers=(
                        [sl.frame_number] if sl.frame_number is not None else None
                    ),
                )
            ],
        )
        evaluations = []
        if sl.manifestation in codes.MANIFESTATION_CODES:
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=codes.SLICE_MANIFESTATION,
                    value=codes.MANIFESTATION_CODES[sl.manifestation],
                )
            )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(sop_instance_uid, f"Key slice {rank}"),
                finding_type=codes.COVID19,
                finding_sites=_lung(),
                measurements=[probability],
                qualitative_evaluations=evaluations or None,
            )
        )
    return groups


def measurement_report(
    inp: ReportInput, sources: SrSources, sop_instance_uid: str
) -> hd.sr.MeasurementReport:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(inp.model_uid),
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=inp.model_name[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dicom_codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )
    groups = [
        study_call_group(inp, sop_instance_uid),
        *manifestation_groups(inp, sop_instance_uid),
        *key_slice_groups(inp, sop_instance_uid),
    ]
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.COMPUTED_TOMOGRAPHY,
        imaging_measurements=groups,
        title=codes.IMAGING_MEASUREMENT_REPORT,
        referenced_images=[library_view(image) for image in sources.key_images] or None,
    )
    if sources.key_images:
        _library_frames(report, inp.key_slices, sources.key_images)
    return report


#: What highdicom's cross-sectional Image Library descriptors (TID 1604) read, with their VM.
CROSS_SECTIONAL = {
    "PixelSpacing": 2,
    "ImageOrientationPatient": 6,
    "ImagePositionPatient": 3,
    "SliceThickness": 1,
}


def library_view(image: Dataset) -> Dataset:
    """``image`` as the Image Library describes it; without geometry when some is unknown.

    highdicom writes the cross-sectional descriptors (TID 1604: pixel spacing,
    orientation, position, slice thickness) for a CT image and needs all of
    them; images whose header lacks one (an empty Slice Thickness is valid in
    CT, Type 2) are described by the common descriptors only (modality from
    the SOP class, Frame of Reference UID when known, rows, columns): a copy
    whose Modality is not a cross-sectional one stops highdicom from reading
    the absent values. The copy is read only by the library builder.
    """
    complete = all(
        keyword in image and len(_values_of(image[keyword].value)) == vm
        for keyword, vm in CROSS_SECTIONAL.items()
    )
    if complete or str(image.get("Modality", "")) not in ("CT", "MR", "PT"):
        return image
    view = Dataset()
    for element in image:
        view.add(element)
    view.Modality = "OT"  # only selects the descriptor set; the entry's modality is the SOP class's
    return view


def _values_of(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _library_frames(
    report: hd.sr.MeasurementReport, key_slices: Sequence[SliceInfo], images: Sequence[Dataset]
) -> None:
    """Referenced Frame Numbers on the Image Library entries of frames.

    highdicom lists the images grouped by (modality, frame of reference) in
    the order given; the entries are matched to the key slices the same way.
    """
    if all(sl.frame_number is None for sl in key_slices):
        return
    groups: dict[tuple[str, ...], list[int]] = {}
    for sl, image in zip(key_slices, images, strict=True):
        key = (str(image.get("Modality", "")), str(image.get("FrameOfReferenceUID", "")))
        groups.setdefault(key, []).append(sl.frame_number or 0)
    frames = [[n] if n else [] for numbers in groups.values() for n in numbers]
    [library] = [
        item for item in report[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
    ]
    entries = [entry for group in library.ContentSequence for entry in group.ContentSequence]
    set_frame_numbers(entries, frames)


def evidence_stub(sl: SliceInfo, study_instance_uid: str) -> Dataset:
    """The four UIDs highdicom needs to list an analysed image as evidence."""
    ds = Dataset()
    ds.SOPClassUID = sl.sop_class_uid
    ds.SOPInstanceUID = sl.sop_instance_uid
    ds.SeriesInstanceUID = sl.series_instance_uid
    ds.StudyInstanceUID = study_instance_uid
    return ds


def build_sr(inp: ReportInput, sources: SrSources) -> hd.sr.Comprehensive3DSR:
    """The SR of an analysis; highdicom validates it while building it."""
    uids = object_uids(inp.study_instance_uid, inp.study_version, inp.model_uid, "sr")
    report = measurement_report(inp, sources, uids.sop_instance_uid)
    evidence = [sources.source]
    listed = {str(sources.source.SOPInstanceUID)}
    for sl in inp.slices:  # frames of one instance: the instance is listed once
        if sl.sop_instance_uid not in listed:
            listed.add(sl.sop_instance_uid)
            evidence.append(evidence_stub(sl, inp.study_instance_uid))
    moment = local_datetime(inp.finished_at)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=inp.study_version,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[sources.predecessor] if sources.predecessor is not None else None,
        series_description=series_description(inp),
        # LO: at most 64 characters, shortened at a word, never inside one
        manufacturer_model_name=textwrap.shorten(inp.model_name, 64, placeholder="..."),
        software_versions=software_version(),
        coding_schemes=[codes.PRIVATE_SCHEME_IDENTIFICATION],
        content_date=moment.date(),
        content_time=moment.time().replace(microsecond=0),
        series_date=moment.date(),
        series_time=moment.time().replace(microsecond=0),
    )
    logger.info(
        "built SR %s for analysis %d (study version %d, call %s)",
        uids.sop_instance_uid,
        inp.analysis_id,
        inp.study_version,
        inp.decision,
    )
    return sr
