"""Checks every report object passes before it enters the export outbox.

An object a PACS or viewer may refuse is worse than none: the radiologist sees
nothing and nobody is told. :func:`check_object` is run on every SR, SC and KO
after it is built; an object with problems is not written to the outbox, and
the analysis records why (``analyses.report_problems``, shown by
``ctdx results show``).

The checks:

1. **highdicom's own**: the object is decoded again with highdicom's
   ``from_dataset`` (SR and KO), which re-validates the content tree.
2. **Strict pydicom round trip**: the object is encoded to Part 10 bytes,
   decoded again, and every value at every level is checked with pydicom's VR
   validators in ``RAISE`` mode (what ``reading_validation_mode = RAISE``
   does on access, without switching the process-wide setting that other
   threads read with); encoded again, it must give the same bytes.
3. **No empty Type 1 value**: every attribute that is Type 1 or 1C in one of
   the IOD's modules (as highdicom's copy of the standard lists them) is
   non-empty where present, and the Type 1 attributes of the mandatory
   modules are present.
4. **Content items** (SR, KO): every item carries the value its Value Type
   requires (PS3.3 C.17.3), e.g. a UIDREF item a valid, non-empty UID: the
   failure of issue 13, an empty Frame of Reference UID in the image library.

The tests add dcmtk's ``dsrdump`` and dicom3tools' ``dciodvfy`` (zero errors),
which a worker host does not need to have.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import date, time
from io import BytesIO
from typing import Any

import highdicom as hd
from pydicom import Dataset, dcmread
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID
from pydicom.valuerep import validate_value

from ctdx.worker.report.errors import ReportError
from ctdx.worker.report.headers import UID_PATTERN, is_empty
from ctdx.worker.report.storage import encode

logger = logging.getLogger(__name__)

#: At most this many problems are kept per object (the first ones name the cause).
MAX_PROBLEMS = 10

#: The value each SR content item Value Type requires (PS3.3 Table C.17.3-2, C.18).
VALUE_OF_TYPE = {
    "TEXT": "TextValue",
    "CODE": "ConceptCodeSequence",
    "NUM": "MeasuredValueSequence",
    "UIDREF": "UID",
    "DATE": "Date",
    "TIME": "Time",
    "DATETIME": "DateTime",
    "PNAME": "PersonName",
    "IMAGE": "ReferencedSOPSequence",
    "COMPOSITE": "ReferencedSOPSequence",
    "WAVEFORM": "ReferencedSOPSequence",
    "CONTAINER": "ContinuityOfContent",
}


class InvalidReportObject(ReportError):
    """A built report object failed the checks; it is not sent."""

    def __init__(self, kind: str, sop_instance_uid: str, problems: list[str]) -> None:
        super().__init__(f"{kind} {sop_instance_uid} is not valid: " + "; ".join(problems))
        self.kind = kind
        self.sop_instance_uid = sop_instance_uid
        self.problems = problems


def check_object(dataset: Dataset) -> list[str]:
    """What is wrong with a report object; an empty list when it may be sent.

    Problems name attributes and paths, never values (they may be patient data).
    """
    return _checked(dataset)[1]


def _checked(dataset: Dataset) -> tuple[bytes, list[str]]:
    """The object's Part 10 bytes (the ones checked) and its problems."""
    problems: list[str] = []
    try:
        data = encode(dataset)
    except (ValueError, TypeError, AttributeError, OverflowError, LookupError) as exc:
        return b"", [f"cannot be encoded ({type(exc).__name__})"]
    try:
        decoded = dcmread(BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the finding itself
        return data, [f"encoded bytes cannot be decoded ({type(exc).__name__})"]
    problems += _values(decoded)
    try:
        same = encode(decoded) == data
    except (ValueError, TypeError, AttributeError, OverflowError, LookupError):
        same = False
    if not same:
        problems.append("decoded and encoded again, the bytes differ from the built object's")
    problems += _type1(decoded)
    if "ContentSequence" in decoded:
        problems += _content_items(decoded)
    problems += _highdicom(decoded)
    return data, problems[:MAX_PROBLEMS]


def require_valid(dataset: Dataset, kind: str) -> bytes:
    """The Part 10 bytes that passed :func:`check_object`, to be written and sent as they are
    (not encoded once more); raises :class:`InvalidReportObject` when it finds problems."""
    data, problems = _checked(dataset)
    if problems:
        raise InvalidReportObject(kind, str(dataset.get("SOPInstanceUID", "?")), problems)
    return data


# --- the checks ---------------------------------------------------------------------------


def _walk(
    dataset: Dataset, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], DataElement]]:
    for element in dataset:
        yield path, element
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item, (*path, element.keyword or str(element.tag)))


def _raw(vr: str, value: Any) -> Any:
    if vr in ("DS", "IS", "PN"):
        return str(value)
    return value


def _values(dataset: Dataset) -> list[str]:
    """Every value at every level passes pydicom's VR validator in RAISE mode."""
    found = []
    for path, element in _walk(dataset):
        if element.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or element.value is None:
            continue
        value = element.value
        values = list(value) if isinstance(value, MultiValue | list) else [value]
        for single in values:
            if isinstance(single, date | time):
                continue
            try:
                validate_value(element.VR, _raw(element.VR, single), pydicom_config.RAISE)
            except (ValueError, TypeError):
                found.append(f"invalid {element.VR} value of {_name(path, element)}")
                break
            if element.VR == "UI" and single and not UID_PATTERN.fullmatch(str(single)):
                found.append(f"invalid UID in {_name(path, element)}")
                break
    return found


def _name(path: tuple[str, ...], element: DataElement) -> str:
    return ">".join((*path, element.keyword or str(element.tag)))


def _normal(path: tuple[str, ...]) -> tuple[str, ...]:
    """Nested content items share one entry of the module tables: collapse the recursion."""
    out: list[str] = []
    for step in path:
        if not (step == "ContentSequence" and out and out[-1] == "ContentSequence"):
            out.append(step)
    return tuple(out)


def _module_rules(sop_class_uid: str) -> tuple[dict[tuple[str, ...], str], list[str]]:
    """((path..., keyword) -> strictest type, root Type 1 keywords of mandatory modules)."""
    from highdicom._standard_utils import (  # highdicom's tables of the standard
        get_iod_module_map,
        get_module_attribute_map,
        get_sop_class_iod_map,
    )

    iod = get_sop_class_iod_map().get(sop_class_uid)
    if iod is None:
        return {}, []
    types: dict[tuple[str, ...], str] = {}
    required: list[str] = []
    attributes = get_module_attribute_map()
    for module in get_iod_module_map()[iod]:
        for attribute in attributes.get(module["key"], []):
            key = (*attribute["path"], attribute["keyword"])
            kind = str(attribute["type"])
            if kind in ("1", "1C") or key not in types:
                types[key] = kind if types.get(key) not in ("1", "1C") else types[key]
            # the document content modules list Type 1C items of the content macros as "1"
            mandatory = module["usage"] == "M" and "content" not in module["key"]
            if mandatory and kind == "1" and not attribute["path"]:
                required.append(attribute["keyword"])
    return types, required


def _type1(dataset: Dataset) -> list[str]:
    types, required = _module_rules(str(dataset.get("SOPClassUID", "")))
    found = [f"Type 1 {keyword} missing" for keyword in required if keyword not in dataset]
    for path, element in _walk(dataset):
        key = (*_normal(path), element.keyword)
        if types.get(key) in ("1", "1C") and _empty(element):
            found.append(f"empty Type {types[key]} {_name(path, element)}")
    return found


def _empty(element: DataElement) -> bool:
    if element.VR == "SQ":
        return len(element.value) == 0
    return is_empty(element.value)


def _content_items(dataset: Dataset) -> list[str]:
    found = []
    for path, element in _walk(dataset):
        if element.keyword != "ContentSequence":
            continue
        for number, item in enumerate(element.value, start=1):
            where = f"{'>'.join((*path, 'ContentSequence'))}[{number}]"
            if "ReferencedContentItemIdentifier" in item:  # by-reference: no value of its own
                continue
            value_type = str(item.get("ValueType", ""))
            needed = VALUE_OF_TYPE.get(value_type)
            if needed is None:
                if value_type not in ("SCOORD", "SCOORD3D", "TCOORD"):
                    found.append(f"content item {where}: unknown value type {value_type!r}")
                continue
            if value_type == "NUM" and needed in item and _empty(item[needed]):
                # Type 2: an empty value needs a Numeric Value Qualifier saying why (C.18.1)
                if _empty_or_missing(item, "NumericValueQualifierCodeSequence"):
                    found.append(f"content item {where} (NUM): no measured value, no qualifier")
                continue
            if needed not in item or _empty(item[needed]):
                found.append(f"content item {where} ({value_type}): {needed} empty or missing")
                continue
            if value_type == "UIDREF" and not UID_PATTERN.fullmatch(str(item.UID)):
                found.append(f"content item {where} (UIDREF): not a valid UID")
            if value_type in ("IMAGE", "COMPOSITE", "WAVEFORM"):
                found += _references(item.ReferencedSOPSequence, where)
    return found


def _empty_or_missing(item: Dataset, keyword: str) -> bool:
    return keyword not in item or _empty(item[keyword])


def _references(sequence: Sequence, where: str) -> list[str]:
    found = []
    for reference in sequence:
        for keyword in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"):
            if is_empty(reference.get(keyword)):
                found.append(f"content item {where}: {keyword} empty or missing")
    return found


def _highdicom(dataset: Dataset) -> list[str]:
    """highdicom decodes the document again, checking its content tree."""
    sop_class = UID(str(dataset.SOPClassUID))
    try:
        if str(dataset.get("Modality", "")) == "SR" and sop_class.keyword.endswith("SRStorage"):
            hd.sr.Comprehensive3DSR.from_dataset(dataset, copy=True)
        elif sop_class.keyword == "KeyObjectSelectionDocumentStorage":
            hd.ko.KeyObjectSelectionDocument.from_dataset(dataset)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        return [f"highdicom refuses the document ({scrubbed(exc)})"]
    return []


def scrubbed(exc: BaseException) -> str:
    """An exception for the database and the log: quoted values (maybe patient data) removed."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    message = re.sub(r"(['\"]).*?\1", "'...'", text)
    return f"{type(exc).__name__}: {message[:300]}" if message else type(exc).__name__
