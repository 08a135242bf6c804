"""Source image headers as the report builders may copy them: only valid, non-empty values.

The SR, SC and KO copy attributes from the analysed images (the Patient and
General Study modules, and, in the SR's image library, Frame of Reference UID,
pixel spacing, position, orientation and slice thickness). Real images carry
empty or malformed values: anonymised exports with an empty Frame of Reference
UID, a Patient's Sex of ``"X"``, a date of ``"2020-01-01"``, an unknown
Specific Character Set. Copied as they are they make objects a PACS or viewer
refuses (issue 13: an empty Type 1 UIDREF in the image library).

:func:`clean_header` turns a header read from the spool into one the builders
can copy blindly:

- an attribute in :data:`TYPE2_COPIED` (Type 2 in every report object) is kept
  when valid, else present and empty: "unknown" in the standard's own words;
- every other top-level attribute with an empty or invalid value is removed,
  so a builder leaves it out (highdicom copies only what is present);
- the Specific Character Set is kept when pydicom knows it; otherwise it is
  replaced by ISO_IR 192 (UTF-8, which encodes every decoded value) when a
  text value is not ASCII, and removed when all are.

Values are checked with pydicom's own VR validators plus the parses the
builders rely on (dates, times, numbers, UIDs); sequences and pixel data are
left as they are.
"""

from __future__ import annotations

import logging
import re
from datetime import date, time
from typing import Any

from pydicom import Dataset
from pydicom import config as pydicom_config
from pydicom.charset import python_encoding
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM, PersonName, validate_value

logger = logging.getLogger(__name__)

#: Type 2 attributes of the Patient and General Study modules that every report object copies
#: from a source image; de-identified images often lack some, and an empty value is valid.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

#: Enumerated values of Patient's Sex (PS3.3 C.7.1.1).
PATIENT_SEX = ("M", "F", "O")
#: Measures that are unknown, not zero, when a de-identified image says 0 (dciodvfy warns).
POSITIVE = ("PatientWeight", "PatientSize")
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UTF8 = "ISO_IR 192"

_TEXT_VRS = ("LO", "LT", "PN", "SH", "ST", "UC", "UT")
_PARSERS: dict[str, Any] = {"DA": DA, "TM": TM, "DT": DT, "IS": int, "DS": float}
_SKIPPED_VRS = ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN")


def is_empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, bytes):
        return value.strip(b" \0") == b""
    if isinstance(value, str):
        return value.strip(" \0") == ""
    if isinstance(value, MultiValue | list | tuple):
        return len(value) == 0 or all(is_empty(v) for v in value)
    return False


def _raw(vr: str, value: object) -> object:
    """The value as the VR validators take it: numbers and names as their strings."""
    if vr in ("DS", "IS", "PN") or isinstance(value, PersonName):
        return str(value)
    return value


def problem(element: DataElement) -> str | None:
    """Why ``element``'s value may not be copied, or ``None`` when it may."""
    value = element.value
    if is_empty(value):
        return "empty"
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    for single in values:
        if isinstance(single, date | time):  # pydicom parsed it already: valid
            continue
        try:
            validate_value(element.VR, _raw(element.VR, single), pydicom_config.RAISE)
        except (ValueError, TypeError):  # the message holds the value: maybe PHI, not kept
            return f"invalid {element.VR}"
        parse = _PARSERS.get(element.VR)
        if parse is not None and not is_empty(single):
            try:
                parsed = parse(str(single).strip())
            except (ValueError, TypeError, OverflowError):
                return f"not a valid {element.VR}"
            if element.VR in ("DA", "TM", "DT") and parsed is None:
                return f"not a valid {element.VR}"
        if element.VR == "UI" and not UID_PATTERN.fullmatch(str(single)):
            return "not a valid UID"
    if element.keyword == "PatientSex" and str(value) not in PATIENT_SEX:
        return "not M, F or O"
    if element.keyword in POSITIVE and not float(value) > 0:
        return "not positive"
    return None


def _charset_known(value: object) -> bool:
    terms = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    terms = [str(t).strip() for t in terms]
    if not terms or terms == [""]:
        return False
    # the first value may be empty: the default repertoire, extended by the others (ISO 2022)
    return all(t in python_encoding for t in terms if t) and (terms[0] != "" or len(terms) > 1)


def _has_non_ascii(dataset: Dataset) -> bool:
    for element in dataset:
        if element.VR in _TEXT_VRS and not is_empty(element.value):
            if not str(element.value).isascii():
                return True
    return False


def clean_header(dataset: Dataset) -> Dataset:
    """Remove (or, for :data:`TYPE2_COPIED`, empty) what the report objects may not copy.

    Works in place on a header freshly read from the spool and returns it.
    Every text value is decoded with the source's own character set before
    that is changed.
    """
    removed: list[str] = []
    for tag in list(dataset.keys()):  # accessing decodes each value with the source charset
        if tag.is_private or tag.group == 0x0002:
            continue
        keyword = keyword_for_tag(tag)
        try:
            element = dataset[tag]
        except (ValueError, TypeError, LookupError):  # cannot be decoded (strict reading)
            why: str | None = "not decodable"
        else:
            if element.VR in _SKIPPED_VRS or keyword in ("SpecificCharacterSet", "PixelData"):
                continue
            why = problem(element)
        if why is None:
            continue
        if keyword in TYPE2_COPIED:
            if why != "empty":
                removed.append(f"{keyword} ({why}, emptied)")
            del dataset[tag]
            setattr(dataset, keyword, "")
        else:
            if why != "empty":
                removed.append(f"{keyword or tag} ({why})")
            del dataset[tag]
    for keyword in TYPE2_COPIED:
        if keyword not in dataset:
            setattr(dataset, keyword, "")
    charset = dataset.get("SpecificCharacterSet")
    if charset is not None and not _charset_known(charset):
        del dataset.SpecificCharacterSet
        removed.append("SpecificCharacterSet (unknown)")
    if "SpecificCharacterSet" not in dataset and _has_non_ascii(dataset):
        dataset.SpecificCharacterSet = UTF8
    if removed:
        logger.info(
            "source image %s: not copied into reports: %s",
            dataset.get("SOPInstanceUID", "?"),
            ", ".join(removed),
        )
    return dataset
