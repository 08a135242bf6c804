"""MedSeg COVID-19 slices with GGO / consolidation masks (the manifestation task).

Layout (``shared/data/medseg-covid19-ggo-consolidation``): ``images/<n>.jpg``
(8-bit, lung window applied, no HU), ``masks/<n>.png`` (0 background, 1 GGO,
2 consolidation) and optionally ``labels.csv`` with per-image pixel counts.

How these images enter the shared preprocessing (documented in docs/training.md):

- **Label**: the paper's manifestation task is single-label (each image is one of
  GGO / consolidation / fibrotic streaks), MedSeg's masks are multi-label. An
  image gets the manifestation with the most mask pixels (37 of 50 show both):
  36 GGO, 14 consolidation. There are no fibrotic-streak labels in this set.
- **Orientation**: images are stored rotated 90 degrees (spine on the right);
  rows carry ``rotate=90`` (clockwise) so they enter anterior-up like CT.
- **Intensity**: grey values are mapped back to approximate HU through the
  assumed lung window -600/1500 (``window``): ``hu = c - w/2 + g/255 * w``;
  the shared segmentation and preprocessing then run unchanged.
- **Cropping**: the slices are cropped inside the body, so there is no air
  around the chest for the segmentation's chest step; rows are marked
  ``cropped`` and the cache frames them for the segmentation only. Pixel spacing
  is unknown (``pixel_spacing`` from ``labels.csv`` if it has the column, else the
  segmentation's default 0.7 mm).
- **Subjects**: the source has no patient identifiers, so every image is its own
  subject; the manifestation split is by image anyway, as in the paper.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ctdx.model_train.importers.common import DataImportError
from ctdx.model_train.importers.image_folders import LUNG_WINDOW
from ctdx.model_train.manifest import ManifestRow, validate_rows

logger = logging.getLogger(__name__)

GGO_VALUE = 1
CONSOLIDATION_VALUE = 2


def dominant_manifestation(ggo_pixels: int, consolidation_pixels: int,
                           streak_pixels: int = 0) -> str | None:
    """The manifestation covering most of the slice (ties: GGO, then consolidation)."""
    counts = [("ground_glass_opacity", ggo_pixels), ("consolidation", consolidation_pixels),
              ("fibrotic_streaks", streak_pixels)]
    name, top = max(counts, key=lambda item: item[1])  # max keeps the first of equal counts
    return name if top > 0 else None


def _counts_from_mask(mask: Path, streak_value: int | None) -> tuple[int, int, int]:
    with Image.open(mask) as img:
        values = np.asarray(img)
    streaks = int((values == streak_value).sum()) if streak_value is not None else 0
    return (int((values == GGO_VALUE).sum()), int((values == CONSOLIDATION_VALUE).sum()),
            streaks)


def import_medseg(
    root: Path,
    window: tuple[float, float] = LUNG_WINDOW,
    rotate: int = 90,
    streak_value: int | None = None,
    cropped: bool = True,
) -> tuple[ManifestRow, ...]:
    """One manifestation row per image with a non-empty mask.

    ``labels.csv`` (columns ``image``, ``ggo_pixels``, ``consolidation_pixels`` and
    optionally ``streak_pixels``) gives the counts; without it they are counted
    in the masks. MedSeg has no fibrotic-streak label (its value 3 is pleural
    effusion), so streaks are counted only where ``streak_value`` names their
    mask value.
    """
    root = Path(root).absolute()
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise DataImportError(f"{root}: expected images/ and masks/ folders")
    counts: dict[str, tuple[int, int, int]] = {}
    spacing: dict[str, float] = {}
    table = root / "labels.csv"
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as fh:
            for raw in csv.DictReader(fh):
                name = Path(raw["image"]).name
                counts[name] = (int(raw["ggo_pixels"]), int(raw["consolidation_pixels"]),
                                int(raw.get("streak_pixels") or 0))
                if raw.get("pixel_spacing"):
                    spacing[name] = float(raw["pixel_spacing"])
    rows: list[ManifestRow] = []
    skipped = 0
    for image in sorted(images_dir.iterdir(), key=lambda p: (len(p.stem), p.stem)):
        if image.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        if image.name not in counts:
            mask = masks_dir / f"{image.stem}.png"
            if not mask.is_file():
                raise DataImportError(f"{image}: no mask {mask.name} and no labels.csv row")
            counts[image.name] = _counts_from_mask(mask, streak_value)
        manifestation = dominant_manifestation(*counts[image.name])
        if manifestation is None:
            skipped += 1
            continue
        ident = f"medseg-{image.stem}"
        rows.append(ManifestRow(subject=ident, study=ident, path=image, label="covid19",
                                manifestation=manifestation, slice_label=True,
                                rotate=rotate, window=window,
                                pixel_spacing=spacing.get(image.name), cropped=cropped))
    if not rows:
        raise DataImportError(f"{root}: no image with a GGO or consolidation mask")
    if skipped:
        logger.info("skipped %d images with empty masks", skipped)
    validate_rows(rows, str(root))
    logger.info("imported %d manifestation images from %s", len(rows), root)
    return tuple(rows)
