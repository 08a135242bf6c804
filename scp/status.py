"""DICOM statuses the listener answers, and the domain errors that map to them.

Handlers translate :class:`Rejected` into a status dataset (Status plus an
Error Comment naming the reason) at the edge; nothing below the handlers knows
about DIMSE. Every code and the reason behind it is listed in
``docs/dicom-conformance.md``.
"""

from __future__ import annotations

from enum import IntEnum

from pydicom import Dataset

__all__ = ["Rejected", "Status", "status_dataset"]


class Status(IntEnum):
    """Status codes used by the listener (PS3.4 B.2.3 storage, PS3.7 C general, PS3.4 F MPPS)."""

    SUCCESS = 0x0000
    # C-STORE, refused
    OUT_OF_RESOURCES = 0xA700  # free disk space under the data dir below CTDX_MIN_FREE_BYTES
    OUT_OF_RESOURCES_STORAGE = 0xA701  # the spool or the database could not take the instance
    # C-STORE, error: data set does not match SOP class
    NOT_CT = 0xA900  # Modality is not CT, or SOP Class UID differs from the command's
    PIXEL_DATA_INCONSISTENT = 0xA901  # Pixel Data length or encoding inconsistent with the header
    SOP_INSTANCE_MISMATCH = 0xA902  # SOP Instance UID differs from the command's
    # C-STORE, error: cannot understand
    CANNOT_PARSE = 0xC210  # the data set cannot be decoded
    MISSING_UID = 0xC220  # Study / Series / SOP Instance UID absent or empty
    INVALID_UID = 0xC221  # a UID that is not a valid UID (e.g. holds "/" or "..")
    # general (PS3.7 Annex C)
    PROCESSING_FAILURE = 0x0110  # MPPS: the step is COMPLETED/DISCONTINUED and may not change
    DUPLICATE_SOP_INSTANCE = 0x0111  # C-STORE: other bytes under a stored UID; N-CREATE again
    NO_SUCH_SOP_INSTANCE = 0x0112  # N-SET of an MPPS that was never created
    INVALID_ATTRIBUTE_VALUE = 0x0106  # MPPS status value not allowed here
    MISSING_ATTRIBUTE = 0x0120  # MPPS N-CREATE without Performed Procedure Step Status
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # the command's SOP class is not its context's


class Rejected(Exception):
    """An input the listener refuses, with the status to answer and a PHI-free reason."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def status_dataset(status: Status, comment: str | None = None) -> Dataset:
    """A status dataset; the Error Comment (LO, 64 chars) tells the sender's operator why."""
    ds = Dataset()
    ds.Status = int(status)
    if comment and status != Status.SUCCESS:
        ds.ErrorComment = comment[:64]
    return ds
