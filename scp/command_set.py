"""DIMSE command sets (group 0000, implicit VR little endian), encoded without pydicom.

One encoder for both users: :mod:`ctdx.scp.transport` installs
:func:`encode_command_set` in place of pydicom's general writer for the command
sets pynetdicom sends, and :mod:`ctdx.scp.fastpath` builds its C-STORE responses
with :func:`command_set`. Same bytes as pydicom's ``write_dataset`` for what it
handles: US, UL, UI (NUL padded), short text VRs (space padded); tests hold
both to pydicom's and pynetdicom's bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR

__all__ = ["command_set", "encode_command_set", "value_bytes"]

_US = struct.Struct("<H")
_UL = struct.Struct("<L")
_HEAD = struct.Struct("<HHL")


def value_bytes(vr: str, value: Any) -> bytes | None:
    """The encoding of one element value (even length); ``None``: a VR not handled.

    Raises ``UnicodeEncodeError`` for text that is not ASCII.
    """
    if value is None or value == "":
        return b""
    if vr == "US":
        values = value if isinstance(value, list) else [value]
        return b"".join(_US.pack(int(v)) for v in values)
    if vr == "UL":
        values = value if isinstance(value, list) else [value]
        return b"".join(_UL.pack(int(v)) for v in values)
    if vr == "UI":
        raw = str(value).encode("ascii")
        return raw + b"\x00" if len(raw) % 2 else raw
    if vr in ("AE", "LO", "SH", "CS", "ST"):
        if not isinstance(value, str):
            return None
        raw = value.encode("ascii")
        return raw + b" " if len(raw) % 2 else raw
    return None


def _element(element: int, encoded: bytes) -> bytes:
    return _HEAD.pack(0x0000, element, len(encoded)) + encoded


def command_set(elements: Sequence[tuple[int, str, Any]]) -> bytes | None:
    """(0000,eeee) elements given as (element, VR, value), in ascending order, preceded by
    their Command Group Length; ``None`` when a value cannot be encoded here."""
    parts = []
    for element, vr, value in elements:
        try:
            encoded = value_bytes(vr, value)
        except (UnicodeEncodeError, TypeError, ValueError, struct.error):
            return None
        if encoded is None:
            return None
        parts.append(_element(element, encoded))
    body = b"".join(parts)
    return _element(0x0000, _UL.pack(len(body))) + body


def encode_command_set(ds: Dataset) -> bytes | None:
    """Encode a DIMSE command set dataset as it is; ``None`` when not one handled here."""
    out = bytearray()
    for tag in sorted(ds.keys()):
        if tag >> 16 != 0:
            return None
        element = ds[tag]
        try:
            vr = element.VR or dictionary_VR(tag)
            encoded = value_bytes(vr, element.value)
        except (KeyError, UnicodeEncodeError, TypeError, ValueError, struct.error):
            return None
        if encoded is None:
            return None
        out += _element(tag & 0xFFFF, encoded)
    return bytes(out)
