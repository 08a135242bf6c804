"""Deterministic UIDs: the same analysis always yields the same report objects.

Sending a report again (a retry after a lost response, a re-run of the task)
therefore reaches the PACS as a duplicate of the same SOP Instance, not as a
second report. A later study version (late instances) or another model gives
other inputs and so a new report.

UIDs are ``pydicom.uid.generate_uid`` with ``entropy_srcs``: a SHA-512 of the
inputs under pydicom's UID root.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pydicom.uid import UID, generate_uid

logger = logging.getLogger(__name__)

ReportKind = Literal["sr", "sc", "ko"]

#: Series numbers of ctdx's objects: high, so they sort after the scanner's series.
SERIES_NUMBERS: dict[ReportKind, int] = {"sr": 9901, "sc": 9902, "ko": 9903}


@dataclass(frozen=True)
class ObjectUids:
    series_instance_uid: str
    sop_instance_uid: str


def object_uids(
    study_instance_uid: str, version: int, model_uid: str, kind: ReportKind
) -> ObjectUids:
    """UIDs of one report object of (study, study version, model).

    One series per study, model and kind collects the objects of successive
    study versions; the instance is per study version.
    """
    series = generate_uid(entropy_srcs=["ctdx-series", study_instance_uid, model_uid, kind])
    sop = generate_uid(
        entropy_srcs=["ctdx-object", study_instance_uid, str(version), model_uid, kind]
    )
    return ObjectUids(series_instance_uid=str(series), sop_instance_uid=str(sop))


def derived_uid(*parts: str) -> str:
    """A UID for content items (tracking UIDs) derived from ``parts``."""
    return str(generate_uid(entropy_srcs=["ctdx-derived", *parts]))


def device_uid(model_uid: str) -> str:
    """The model's UID when it is a valid DICOM UID, otherwise one derived from it."""
    if UID(model_uid).is_valid:
        return model_uid
    return derived_uid("device", model_uid)
