"""Checks of a DIMSE request's command against its presentation context, for both paths.

pynetdicom chooses the service class from the command's Affected SOP Class
UID, not from the presentation context the request came on, so a C-STORE of
MR Image Storage (or a C-ECHO) sent on a context negotiated for CT Image
Storage would reach our storage handler (or be answered success). PS3.7 9.1.1
/ 9.1.5: the command's SOP class must be the context's abstract syntax; any
other is refused 0x0122 (*SOP class not supported*), never stored. The
Affected SOP Instance UID of a C-STORE names the stored file: missing or empty
is 0xC220, anything that is not a valid UID (too long, not ASCII, a ``/``)
0xC221, as for the UIDs in the data set. The fast path (:mod:`ctdx.scp.fastpath`)
and the pynetdicom handlers (:mod:`ctdx.scp.handlers`) call the same functions.
"""

from __future__ import annotations

from ctdx.scp.status import Rejected, Status
from ctdx.scp.uids import InvalidUid, validate_uid

__all__ = ["check_context", "check_store_command"]


def check_context(context_abstract_syntax: str, sop_class_uid: str) -> Rejected | None:
    """The refusal when the command's SOP class is not the context's abstract syntax."""
    if sop_class_uid.rstrip("\x00 ") == context_abstract_syntax:
        return None
    return Rejected(Status.SOP_CLASS_NOT_SUPPORTED,
                    "SOP class of the command is not the presentation context's")


def check_store_command(context_abstract_syntax: str, sop_class_uid: str,
                        sop_instance_uid: str | None) -> Rejected | None:
    """The refusal of a C-STORE command, or ``None`` when it may be stored."""
    refused = check_context(context_abstract_syntax, sop_class_uid)
    if refused is not None:
        return refused
    try:
        validate_uid(sop_instance_uid, "Affected SOP Instance UID")
    except InvalidUid as exc:
        missing = exc.problem in ("is missing", "is empty")
        return Rejected(Status.MISSING_UID if missing else Status.INVALID_UID, str(exc))
    return None
