"""Why an association was rejected, in words (for the log and the refusal metrics)."""

from __future__ import annotations

from typing import Any

from pynetdicom.events import Event

_REJECT_REASONS = {
    (0x01, 0x03): "calling AE title not allowed",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "no reason given",
    (0x03, 0x02): "association limit reached",
}

def reject_reason(event: Event) -> str:
    """Why an association was rejected, in words (a short, fixed text)."""
    primitive: Any = event.assoc.acceptor.primitive
    key = (int(getattr(primitive, "result_source", 0) or 0),
           int(getattr(primitive, "diagnostic", 0) or 0))
    return _REJECT_REASONS.get(key, f"source/reason {key}")
