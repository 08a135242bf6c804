"""DICOM series with a per-file label table, or class/subject folders of DICOM series.

The table layout is COVID-CT-MD's as prepared in ``shared/data/covid-ct-md``:
``slice_labels.csv`` with one row per DICOM file and the columns ``subject``,
``class``, ``file`` (relative to the table's folder) and ``infection`` (1 when
radiologists marked infection on that slice, 0 when not, empty when the subject
has only a patient-level label). ``slice_label`` is accepted instead of
``infection``.

The study and series identifiers come from the DICOM headers
(StudyInstanceUID, SeriesInstanceUID); no other header field is read, so no
patient identifier enters the manifest.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path

import pydicom

from ctdx.model_train.importers.common import DEFAULT_CLASS_MAP, DataImportError, map_class
from ctdx.model_train.manifest import ManifestRow, validate_rows

logger = logging.getLogger(__name__)

_UID_TAGS = ["StudyInstanceUID", "SeriesInstanceUID"]


def _uids(path: Path) -> tuple[str, str]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_UID_TAGS)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise DataImportError(f"{path}: not a readable DICOM file ({exc})") from None
    study = str(ds.get("StudyInstanceUID", ""))
    series = str(ds.get("SeriesInstanceUID", ""))
    if not study:
        raise DataImportError(f"{path}: no StudyInstanceUID")
    return study, series


def import_dicom_table(
    table: Path, class_map: Mapping[str, str] = DEFAULT_CLASS_MAP
) -> tuple[ManifestRow, ...]:
    """Rows from a per-file label table (``slice_labels.csv``) and the DICOM headers."""
    table = Path(table)
    if table.is_dir():
        table = table / "slice_labels.csv"
    if not table.is_file():
        raise DataImportError(f"{table}: label table not found")
    base = table.parent.absolute()
    rows: list[ManifestRow] = []
    with table.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        missing = {"subject", "class", "file"} - cols
        if missing:
            raise DataImportError(f"{table}: missing column(s) {', '.join(sorted(missing))}")
        label_col = "infection" if "infection" in cols else "slice_label"
        for raw in reader:
            where = f"{table}:{reader.line_num}"
            cls = map_class(raw["class"], class_map)
            if cls is None:
                raise DataImportError(
                    f"{where}: class {raw['class']!r} is not in the class map "
                    "(add it with --class-map NAME=CLASS)"
                )
            path = base / raw["file"]
            if not path.is_file():
                raise DataImportError(f"{where}: file {raw['file']!r} not found")
            study, series = _uids(path)
            text = (raw.get(label_col) or "").strip()
            if text not in ("", "0", "1"):
                raise DataImportError(f"{where}: {label_col} must be 0, 1 or empty, not {text!r}")
            rows.append(
                ManifestRow(
                    subject=raw["subject"].strip(),
                    study=study,
                    series=series,
                    path=path,
                    label=cls,
                    slice_label=None if text == "" else text == "1",
                )
            )
    validate_rows(rows, str(table))
    logger.info("imported %d DICOM slices from %s", len(rows), table)
    return tuple(rows)


def import_dicom_tree(
    root: Path, class_map: Mapping[str, str] = DEFAULT_CLASS_MAP
) -> tuple[ManifestRow, ...]:
    """One series row per folder of DICOM files under ``root/<class>/<subject>/...``.

    Without slice labels every slice of a series carries its study's class.
    Folders whose name is not in ``class_map`` are skipped with a warning.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise DataImportError(f"{root}: not a folder")
    rows: list[ManifestRow] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        cls = map_class(class_dir.name, class_map)
        if cls is None:
            logger.warning("skipping folder %s: not in the class map", class_dir.name)
            continue
        for subject_dir in sorted(p for p in class_dir.iterdir() if p.is_dir()):
            series_dirs = sorted(
                {f.parent for f in subject_dir.rglob("*") if f.is_file() and _is_dicom(f)}
            )
            for series_dir in series_dirs:
                first = next(f for f in sorted(series_dir.iterdir()) if _is_dicom(f))
                study, series = _uids(first)
                rows.append(ManifestRow(subject=subject_dir.name, study=study, series=series,
                                        path=series_dir, label=cls))
    if not rows:
        raise DataImportError(
            f"{root}: no DICOM series under <class>/<subject>/ folders named in the class map"
        )
    validate_rows(rows, str(root))
    logger.info("imported %d DICOM series from %s", len(rows), root)
    return tuple(rows)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix:
        return False
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False
