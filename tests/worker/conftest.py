"""Fixtures of the worker tests: a spool + database filled like the listener does, small models.

``add_series`` stores DICOM files the way the listener does (a file under the
spool, ``studies``/``study_versions``/``series``/``instances`` rows) so the
worker can be tested before and independently of ``scp/``. Files from
``../shared/data`` are symlinked into the temporary spool, never copied into
the repository.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine, select

from db.models import Instance, Series, Study, StudyVersion, VersionState
from db.session import make_engine, session_scope
from db.settings import Settings, load_settings


@dataclass(frozen=True)
class StoredStudy:
    study_version_id: int
    study_instance_uid: str
    series_instance_uids: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]


def store_files(
    engine: Engine, spool_dir: Path, files: Sequence[Path], version: int = 1, link: bool = True
) -> StoredStudy:
    """Put ``files`` (one study) into the spool and the listener's tables; state ``queued``."""
    sops: list[str] = []
    series_uids: list[str] = []
    with session_scope(engine) as session:
        version_row: StudyVersion | None = None
        study_uid = ""
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study_uid = str(ds.StudyInstanceUID)
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            if study is None:
                study = Study(study_instance_uid=study_uid, patient_id=str(ds.get("PatientID", "")))
                session.add(study)
                session.flush()
            if version_row is None:
                version_row = StudyVersion(
                    study_id=study.id, version=version, state=VersionState.QUEUED.value
                )
                session.add(version_row)
                session.flush()
            series_uid = str(ds.SeriesInstanceUID)
            series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
            if series is None:
                number = ds.get("SeriesNumber")
                series = Series(
                    study_id=study.id,
                    series_instance_uid=series_uid,
                    modality=str(ds.get("Modality", "")) or None,
                    series_number=int(number) if number not in (None, "") else None,
                )
                session.add(series)
                session.flush()
                series_uids.append(series_uid)
            sop = str(ds.SOPInstanceUID)
            relative = Path(study_uid) / series_uid / f"{sop}.dcm"
            target = spool_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.resolve() != target.resolve():
                if link:
                    target.symlink_to(path.resolve())
                else:
                    target.write_bytes(path.read_bytes())
            session.add(
                Instance(
                    series_id=series.id,
                    study_version_id=version_row.id,
                    sop_instance_uid=sop,
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    path=str(relative),
                    size_bytes=path.stat().st_size,
                    sha256=hashlib.sha256(str(path).encode()).hexdigest(),
                )
            )
            sops.append(sop)
        assert version_row is not None, "no files given"
        version_row.instance_count = len(sops)
        return StoredStudy(version_row.id, study_uid, tuple(series_uids), tuple(sops))


@pytest.fixture
def worker_settings(tmp_path: Path, sqlite_url: str) -> Settings:
    """Settings for an in-process worker on a fresh SQLite database (no models yet)."""
    return load_settings(
        data_dir=tmp_path / "data", database_url=sqlite_url, broker_url="memory://",
        claim_timeout=30,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Callable[..., StoredStudy]]:
    """``store(url, files)``: put files into ``tmp_path/data/spool`` and the DB at ``url``."""
    engines: dict[str, Engine] = {}

    def _store(url: str, files: Sequence[Path], **kwargs: object) -> StoredStudy:
        engine = engines.setdefault(url, make_engine(url))
        return store_files(engine, tmp_path / "data" / "spool", files, **kwargs)  # type: ignore[arg-type]

    yield _store
    for engine in engines.values():
        engine.dispose()
