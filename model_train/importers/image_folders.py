"""Slice images in one folder per class (CC-CCII, COVID-CT).

Accepted depths under ``root/<class folder>/``:

- ``<image>``: no subject identifiers exist (COVID-CT's non-COVID images); each
  image becomes its own subject and study, so a "subject-level" split is an
  image-level split for these rows. A warning says so.
- ``<subject>/<image>``: one study per subject.
- ``<subject>/<study>/.../<image>`` (CC-CCII: patient/scan/slice): study is the
  second level, deeper folders are ignored for identity.

Subject identifiers are used as they are: if two class folders share a patient
folder name, they are the same subject (CC-CCII's patient ids are global).
Images are 8-bit and windowed: rows get the assumed display window
(``window``, default lung window -600/1500) so :mod:`ctdx.model_train.sources` can map
grey values back to approximate Hounsfield units.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ctdx.model_train.importers.common import DEFAULT_CLASS_MAP, DataImportError, map_class
from ctdx.model_train.manifest import IMAGE_SUFFIXES, ManifestRow, validate_rows

logger = logging.getLogger(__name__)

LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)


def import_image_folders(
    root: Path,
    class_map: Mapping[str, str] = DEFAULT_CLASS_MAP,
    window: tuple[float, float] = LUNG_WINDOW,
    rotate: int = 0,
) -> tuple[ManifestRow, ...]:
    """Rows for every slice image under the class folders named in ``class_map``."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise DataImportError(f"{root}: not a folder")
    rows: list[ManifestRow] = []
    flat = 0
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        cls = map_class(class_dir.name, class_map)
        if cls is None:
            logger.warning("skipping folder %s: not in the class map", class_dir.name)
            continue
        for image in sorted(class_dir.rglob("*")):
            if not (image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES):
                continue
            parts = image.relative_to(class_dir).parts
            if len(parts) == 1:
                flat += 1
                subject = f"{class_dir.name}/{image.stem}"
                study = subject
            elif len(parts) == 2:
                subject = parts[0]
                study = parts[0]
            else:
                subject = parts[0]
                study = f"{parts[0]}/{parts[1]}"
            rows.append(ManifestRow(subject=subject, study=study, path=image, label=cls,
                                    rotate=rotate, window=window))
    if not rows:
        raise DataImportError(
            f"{root}: no slice images under class folders named in the class map "
            f"(known: {', '.join(sorted(class_map))})"
        )
    if flat:
        logger.warning(
            "%d images lie directly in a class folder: no subject ids, each image is its own "
            "subject (the split cannot keep a patient's slices together)", flat,
        )
    validate_rows(rows, str(root))
    logger.info("imported %d slice images from %s", len(rows), root)
    return tuple(rows)
