"""Report files under the data directory, written durably before their outbox row exists.

``<data_dir>/reports/<StudyInstanceUID>/<kind>-<SOPInstanceUID>.dcm``: a
temporary file in the same directory, fsync, rename over the final name,
fsync of the directory. A crash leaves either no file or the whole file, and
an export row never names a file that is not on disk.
"""

from __future__ import annotations

import logging
import os
import tempfile
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread

from ctdx.worker.report.uids import ReportKind

logger = logging.getLogger(__name__)

REPORTS_DIR = "reports"


def relative_path(study_instance_uid: str, kind: ReportKind, sop_instance_uid: str) -> Path:
    """Where an object lives, relative to the data directory (stored in ``exports.path``)."""
    return Path(REPORTS_DIR) / study_instance_uid / f"{kind}-{sop_instance_uid}.dcm"


def write_durably(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, synced to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def encode(dataset: Dataset) -> bytes:
    """The Part 10 file bytes of ``dataset`` (preamble, file meta, data set)."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def save(data_dir: Path, kind: ReportKind, dataset: Dataset, data: bytes) -> Path:
    """Write ``data``, the Part 10 bytes of ``dataset`` that were checked, durably; returns
    its path relative to ``data_dir``."""
    rel = relative_path(str(dataset.StudyInstanceUID), kind, str(dataset.SOPInstanceUID))
    write_durably(data_dir / rel, data)
    logger.info("wrote %s %s (%s)", kind, dataset.SOPInstanceUID, rel)
    return rel


def read_header(path: Path) -> Dataset:
    """Everything but the pixel data of a stored file."""
    return dcmread(path, stop_before_pixels=True)
