"""What the listener needs to know about a received instance, read from its header.

One pass of the fast walker of :mod:`ctdx.scp.header_scan` over the whole element
stream (its structural check: no pixel decode on the hot path) gives the
header values and where the pixel data is; deflated data sets are inflated to
a temporary file first (:mod:`ctdx.scp.deflate`). The pixel data element is then
checked against Rows, Columns, Samples per Pixel, Bits Allocated and Number of
Frames (which must be a positive integer when present): native encodings must
have exactly the expected length, encapsulated ones at least one fragment per
frame (a corrupt codestream is the worker's to find: decoding here would cost
the hot path a decompression). Every refusal is a :class:`~scp.status.Rejected`
naming the reason without patient data.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from ctdx.scp.deflate import inflated
from ctdx.scp.header_scan import HeaderError, NestingTooDeep, RawHeader, scan_header
from ctdx.scp.status import Rejected, Status
from ctdx.scp.uids import InvalidUid, validate_uid

logger = logging.getLogger(__name__)

__all__ = ["InstanceHeader", "SeriesFacts", "StudyFacts", "read_instance_header"]

_SPECIFIC_CHARACTER_SET = 0x00080005
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_DATE = 0x00080020
_ACCESSION_NUMBER = 0x00080050
_MODALITY = 0x00080060
_STUDY_DESCRIPTION = 0x00081030
_SERIES_DESCRIPTION = 0x0008103E
_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_SERIES_NUMBER = 0x00200011
_SAMPLES_PER_PIXEL = 0x00280002
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100
_WANTED = frozenset(
    {
        _SPECIFIC_CHARACTER_SET, _SOP_CLASS_UID, _SOP_INSTANCE_UID, _STUDY_DATE,
        _ACCESSION_NUMBER, _MODALITY, _STUDY_DESCRIPTION, _SERIES_DESCRIPTION, _PATIENT_NAME,
        _PATIENT_ID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID, _SERIES_NUMBER,
        _SAMPLES_PER_PIXEL, _NUMBER_OF_FRAMES, _ROWS, _COLUMNS, _BITS_ALLOCATED,
    }
)
_KEYWORDS = {
    _STUDY_INSTANCE_UID: "StudyInstanceUID",
    _SERIES_INSTANCE_UID: "SeriesInstanceUID",
    _SOP_INSTANCE_UID: "SOPInstanceUID",
}
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PN_DELIMITERS = {0x5E, 0x3D}  # ^ =


@dataclass(frozen=True)
class StudyFacts:
    """Study-level attributes stored with the study (patient fields are PHI: never logged)."""

    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None


@dataclass(frozen=True)
class SeriesFacts:
    modality: str | None
    series_number: int | None
    series_description: str | None


@dataclass(frozen=True)
class InstanceHeader:
    """The validated identity of one received instance; every UID is safe in a path."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study: StudyFacts
    series: SeriesFacts


@dataclass(frozen=True)
class _Image:
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int

    @property
    def native_length(self) -> int:
        if self.bits_allocated == 1:
            return (self.rows * self.columns * self.samples * self.frames + 7) // 8
        bytes_per_sample = (self.bits_allocated + 7) // 8
        return self.rows * self.columns * self.samples * self.frames * bytes_per_sample


class _Values:
    """Typed access to the raw header values (tolerant: odd padding, stray spaces)."""

    def __init__(self, raw: dict[int, bytes], implicit: bool) -> None:
        self.raw = raw
        self.implicit = implicit
        charset = self.text(_SPECIFIC_CHARACTER_SET)
        terms = [t.strip() for t in charset.split("\\")] if charset else None
        self.encodings = convert_encodings(terms)

    def text(self, tag: int, max_length: int | None = None) -> str | None:
        value = self.raw.get(tag)
        if not value:
            return None
        if tag in (_PATIENT_NAME, _STUDY_DESCRIPTION, _SERIES_DESCRIPTION, _PATIENT_ID,
                   _ACCESSION_NUMBER):
            delimiters = _PN_DELIMITERS if tag == _PATIENT_NAME else set()
            text = decode_bytes(value, self.encodings, delimiters)
        else:
            text = value.decode("ascii", errors="replace")
        text = text.strip("\x00 ")
        if not text:
            return None
        return text[:max_length] if max_length else text

    def uid(self, tag: int) -> str | None:
        value = self.raw.get(tag)
        return None if value is None else value.decode("latin-1")

    def us(self, tag: int) -> int | None:
        value = self.raw.get(tag)
        if value is None or len(value) != 2:
            return None
        return int(struct.unpack("<H", value)[0])

    def integer_string(self, tag: int) -> int | None:
        text = self.text(tag)
        try:
            return None if text is None else int(text)
        except ValueError:
            return None


def read_instance_header(
    path: Path,
    transfer_syntax_uid: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    scratch: Path | None = None,
) -> InstanceHeader:
    """Read and check the instance at ``path`` (a received file with File Meta).

    ``sop_class_uid`` and ``sop_instance_uid`` are the C-STORE command's Affected
    SOP Class / Instance UID; the data set must agree with both. A deflated data
    set is inflated into a temporary file in ``scratch`` (default: beside ``path``).

    Raises
    ------
    Rejected
        With the status to answer: cannot parse, missing or invalid UID,
        mismatch with the command, not CT, pixel data inconsistent.
    """
    syntax = UID(transfer_syntax_uid)
    if syntax == DeflatedExplicitVRLittleEndian:
        with inflated(path, scratch) as plain:
            header = _scan(plain, ExplicitVRLittleEndian)
    else:
        header = _scan(path, syntax)
    values = _Values(header.values, syntax.is_implicit_VR)
    uids = _identity(values, sop_class_uid, sop_instance_uid)
    modality = values.text(_MODALITY)
    if modality != "CT":
        raise Rejected(
            Status.NOT_CT,
            f"Modality is {modality or 'absent'}, not CT, under a CT storage SOP class",
        )
    _check_pixel_data(header, syntax, _image(values))
    return InstanceHeader(
        study_instance_uid=uids[0],
        series_instance_uid=uids[1],
        sop_instance_uid=uids[2],
        sop_class_uid=sop_class_uid,
        transfer_syntax_uid=str(syntax),
        study=StudyFacts(
            patient_id=values.text(_PATIENT_ID, 64),
            patient_name=values.text(_PATIENT_NAME, 324),
            accession_number=values.text(_ACCESSION_NUMBER, 16),
            study_date=values.text(_STUDY_DATE, 8),
            study_description=values.text(_STUDY_DESCRIPTION, 64),
        ),
        series=SeriesFacts(
            modality=modality,
            series_number=values.integer_string(_SERIES_NUMBER),
            series_description=values.text(_SERIES_DESCRIPTION, 64),
        ),
    )


def _scan(path: Path, syntax: UID) -> RawHeader:
    """Walk the whole file (the structural check) and read its header values."""
    try:
        with path.open("rb") as fp:
            return scan_header(fp, syntax.is_implicit_VR, _WANTED)
    except NestingTooDeep as exc:
        raise Rejected(Status.CANNOT_PARSE, str(exc)) from exc
    except HeaderError as exc:  # our own messages: where the walk failed, never a value
        raise Rejected(Status.CANNOT_PARSE, f"data set cannot be parsed ({exc})") from exc
    except (struct.error, LookupError, ValueError) as exc:
        raise Rejected(
            Status.CANNOT_PARSE, f"data set cannot be parsed ({type(exc).__name__})"
        ) from exc


def _identity(values: _Values, sop_class_uid: str, sop_instance_uid: str) -> tuple[str, str, str]:
    found = []
    for tag in (_STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID, _SOP_INSTANCE_UID):
        keyword = _KEYWORDS[tag]
        try:
            found.append(validate_uid(values.uid(tag), keyword))
        except InvalidUid as exc:
            missing = exc.problem in ("is missing", "is empty")
            status = Status.MISSING_UID if missing else Status.INVALID_UID
            raise Rejected(status, str(exc)) from exc
    if found[2] != sop_instance_uid:
        raise Rejected(
            Status.SOP_INSTANCE_MISMATCH, "SOPInstanceUID differs from the C-STORE command's"
        )
    data_set_class = values.uid(_SOP_CLASS_UID)
    if data_set_class is not None and data_set_class.rstrip("\x00 ") != sop_class_uid:
        raise Rejected(Status.NOT_CT, "SOPClassUID differs from the C-STORE command's")
    return found[0], found[1], found[2]


def _image(values: _Values) -> _Image:
    rows = values.us(_ROWS)
    columns = values.us(_COLUMNS)
    bits = values.us(_BITS_ALLOCATED)
    if not rows or not columns or not bits:
        raise Rejected(
            Status.PIXEL_DATA_INCONSISTENT, "Rows, Columns or Bits Allocated absent or zero"
        )
    samples = values.us(_SAMPLES_PER_PIXEL) or 1
    frames = 1
    if values.text(_NUMBER_OF_FRAMES) is not None:
        parsed = values.integer_string(_NUMBER_OF_FRAMES)
        if parsed is None or parsed < 1:
            raise Rejected(Status.PIXEL_DATA_INCONSISTENT,
                           "Number of Frames is not a positive integer")
        frames = parsed
    return _Image(rows, columns, samples, bits, frames)


def _check_pixel_data(header: RawHeader, syntax: UID, image: _Image) -> None:
    pixel = header.pixel_data
    if pixel is None:
        raise Rejected(Status.PIXEL_DATA_INCONSISTENT, "no Pixel Data (7FE0,0010)")
    if pixel.vr is not None and pixel.vr not in (b"OB", b"OW"):
        raise Rejected(Status.PIXEL_DATA_INCONSISTENT, "Pixel Data has an unexpected VR")
    if syntax.is_encapsulated:
        if pixel.fragments is None:
            raise Rejected(
                Status.PIXEL_DATA_INCONSISTENT, "compressed Pixel Data must have undefined length"
            )
        if pixel.fragments < image.frames:
            raise Rejected(
                Status.PIXEL_DATA_INCONSISTENT,
                f"compressed Pixel Data has {pixel.fragments} fragments for {image.frames} frames",
            )
        return
    expected = image.native_length
    if pixel.fragments is not None or pixel.length not in (expected, expected + 1):
        shown = "undefined" if pixel.fragments is not None else str(pixel.length)
        raise Rejected(
            Status.PIXEL_DATA_INCONSISTENT,
            f"Pixel Data length {shown}, header implies {expected}",
        )
