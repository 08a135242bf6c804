"""Logging for entry points. Library modules only ``getLogger(__name__)``.

Logs carry UIDs and database ids, never patient names, IDs or birth dates:
pynetdicom's identifier logging (whole C-FIND/C-STORE identifier datasets)
is switched off here.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from rich.logging import RichHandler

FORMAT = "%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s"

#: Libraries whose INFO lines are routine (Alembic: its context and migration lines at
#: every start; highdicom: seven lines per SR it builds): shown only at DEBUG.
CHATTY_LIBRARIES = ("alembic", "highdicom")


def silence_identifier_logging() -> None:
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"


class CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now, not the one at configuration time.

    An entry point run twice in one process (tests through a CLI runner, the demo
    calling ``ctdx results``) would otherwise keep writing to a stream that was
    swapped out and closed.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(level: str = "INFO", rich: bool = False) -> None:
    """Configure the root logger once for a process (idempotent)."""
    silence_identifier_logging()
    root = logging.getLogger()
    if getattr(root, "_ctdx_configured", False):
        root.setLevel(level)
        _library_levels(root.level)
        return
    handler: logging.Handler
    if rich:
        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    _library_levels(root.level)
    root._ctdx_configured = True  # type: ignore[attr-defined]


def _library_levels(level: int) -> None:
    """Quiet the chatty libraries: WARNING and up, or all of theirs at DEBUG (the verbose
    setting: ``--log-level debug`` / ``--loglevel debug``)."""
    # pynetdicom is chatty at INFO (every PDU summary); keep warnings only, even at DEBUG
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, level))
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG
                                         else max(logging.WARNING, level))
