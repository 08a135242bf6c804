"""UID validation: the only strings that ever become parts of a spool path.

A UID here is what PS3.5 §9 allows: components of digits separated by single
dots, at most 64 characters. Anything else (``/``, ``..``, spaces, letters, an
empty component) is refused before it can reach the file system. Leading zeros
in a component are tolerated: some scanners emit them, and they are harmless in
a file name (tolerant when decoding).
"""

from __future__ import annotations

import re

__all__ = ["MAX_UID_LENGTH", "InvalidUid", "is_valid_uid", "validate_uid"]

MAX_UID_LENGTH = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


class InvalidUid(ValueError):
    """A UID attribute is absent, empty, or not a valid UID.

    The message names the attribute (its keyword), never its value: a broken
    value may hold anything, including patient data.
    """

    def __init__(self, keyword: str, problem: str) -> None:
        super().__init__(f"{keyword} {problem}")
        self.keyword = keyword
        self.problem = problem


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid UID (see the module docstring)."""
    return len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def validate_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a ``str`` when it is a valid UID, else raise :class:`InvalidUid`.

    A single trailing NUL or space (DICOM's padding to even length) is dropped.
    """
    if value is None:
        raise InvalidUid(keyword, "is missing")
    text = str(value)
    if text.endswith(("\x00", " ")):
        text = text[:-1]
    if not text:
        raise InvalidUid(keyword, "is empty")
    if not is_valid_uid(text):
        raise InvalidUid(keyword, "is not a valid UID")
    return text
