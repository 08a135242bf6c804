"""Logging for entry points. Library modules only ``getLogger(__name__)``.

Logs carry UIDs and database ids, never patient names, IDs or birth dates:
pynetdicom's identifier logging (whole C-FIND/C-STORE identifier datasets)
is switched off here.
"""

from __future__ import annotations

import logging

from rich.logging import RichHandler

FORMAT = "%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s"


def silence_identifier_logging() -> None:
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"


def configure_logging(level: str = "INFO", rich: bool = False) -> None:
    """Configure the root logger once for a process (idempotent)."""
    silence_identifier_logging()
    root = logging.getLogger()
    if getattr(root, "_ctdx_configured", False):
        root.setLevel(level)
        return
    handler: logging.Handler
    if rich:
        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom is chatty at INFO (every PDU summary); keep warnings only
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    root._ctdx_configured = True  # type: ignore[attr-defined]
