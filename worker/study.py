"""What the listener stored about a study version, read once and handed out as frozen data.

A version's instances are every instance of the study received in this
version or an earlier one: a late series (version 2) is analysed together
with what came before, and the newest version is the one whose analysis a
radiologist sees. Earlier versions whose files were pruned from the spool
(``spool_prunes``, :mod:`ctdx.scp.retention`) are left out: their files are gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ctdx.db.models import Instance, Series, SpoolPrune, Study, StudyVersion

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceRef:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path  # absolute: spool dir joined with the stored relative path


@dataclass(frozen=True)
class SeriesRef:
    series_instance_uid: str
    series_number: int | None
    modality: str | None
    series_description: str | None
    instances: tuple[InstanceRef, ...]


@dataclass(frozen=True)
class StudyVersionRef:
    study_version_id: int
    study_instance_uid: str
    version: int
    state: str
    series: tuple[SeriesRef, ...]


class StudyVersionNotFound(LookupError):
    """The task names a study version that is not in the database."""


def load_study_version(session: Session, study_version_id: int, spool_dir: Path) -> StudyVersionRef:
    """The study version with its series and instance files (absolute paths)."""
    row = session.execute(
        select(StudyVersion, Study)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(StudyVersion.id == study_version_id)
    ).one_or_none()
    if row is None:
        raise StudyVersionNotFound(f"study version {study_version_id} does not exist")
    version, study = row
    rows = session.execute(
        select(Series, Instance)
        .join(Instance, Instance.series_id == Series.id)
        .join(StudyVersion, StudyVersion.id == Instance.study_version_id)
        .where(
            Series.study_id == study.id,
            StudyVersion.study_id == study.id,
            StudyVersion.version <= version.version,
            StudyVersion.id.not_in(select(SpoolPrune.study_version_id)),
        )
        .order_by(Series.series_number, Series.id, Instance.id)
    ).all()
    grouped: dict[int, tuple[Series, list[InstanceRef]]] = {}
    for series, instance in rows:
        entry = grouped.setdefault(series.id, (series, []))
        entry[1].append(
            InstanceRef(
                sop_instance_uid=instance.sop_instance_uid,
                sop_class_uid=instance.sop_class_uid,
                transfer_syntax_uid=instance.transfer_syntax_uid,
                path=(spool_dir / instance.path).absolute(),
            )
        )
    series_refs = tuple(
        SeriesRef(
            series_instance_uid=series.series_instance_uid,
            series_number=series.series_number,
            modality=series.modality,
            series_description=series.series_description,
            instances=tuple(instances),
        )
        for series, instances in grouped.values()
    )
    return StudyVersionRef(
        study_version_id=version.id,
        study_instance_uid=study.study_instance_uid,
        version=version.version,
        state=version.state,
        series=series_refs,
    )
