"""Synthetic labelled data sets in the layouts the importers read (tests, demo model, benchmarks).

- :func:`write_recognition_set`: phantom DICOM series (``ctdx.model_train.phantom``) in
  the COVID-CT-MD layout: ``<COVID-19|CAP|Normal>/<subject>/<SOP>.dcm`` plus
  ``slice_labels.csv`` (lesion slices marked, normal subjects unlabelled as in
  the real set), read by :func:`~model_train.importers.dicom_table.import_dicom_table`.
- :func:`write_manifestation_set`: 8-bit slice images in the MedSeg layout
  (``images/``, ``masks/``, lung window, stored rotated 90 degrees like the real
  set) with one manifestation drawn into the lungs of a normal phantom slice:
  ground-glass patches (-550 HU), consolidation (30 HU) or fibrotic streaks
  (thin dense lines, which the real set lacks); cropped to the lungs like
  MedSeg's slices. Read by :func:`~model_train.importers.medseg.import_medseg`;
  ``labels.csv`` carries the streak pixel counts and the pixel spacing.

No patient data: every image is computed.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from ctdx.model_train.phantom import (
    PhantomKind,
    phantom_labels,
    phantom_slice,
    write_phantom_series,
)

logger = logging.getLogger(__name__)

CLASS_FOLDERS: dict[PhantomKind, str] = {
    "covid19": "COVID-19",
    "other_pneumonia": "CAP",
    "normal": "Normal",
}
STREAK_VALUE = 3


def write_recognition_set(
    root: Path,
    subjects_per_class: int = 4,
    n_slices: int = 16,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write phantom series for each class; returns the ``slice_labels.csv`` path."""
    root.mkdir(parents=True, exist_ok=True)
    table = root / "slice_labels.csv"
    rows: list[list[str]] = []
    for ci, (kind, folder) in enumerate(CLASS_FOLDERS.items()):
        for j in range(subjects_per_class):
            subject = f"{folder.lower().replace('-', '')}{j + 1:03d}"
            subject_seed = seed * 10_000 + ci * 1_000 + j
            study = write_phantom_series(
                root / folder / subject, kind=kind, n_slices=n_slices, size=size,
                seed=subject_seed, patient_id=f"SYN-{subject}",
            )
            labels = phantom_labels(kind, n_slices)
            for path, lesion in zip(study.paths, labels, strict=True):
                infection = "" if kind == "normal" else str(int(lesion))
                rows.append([subject, folder, path.relative_to(root).as_posix(), infection])
    with table.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "class", "file", "infection"])
        w.writerows(rows)
    logger.info("wrote %d synthetic slices of %d subjects to %s", len(rows),
                3 * subjects_per_class, root)
    return table


def _lung_window_u8(hu: NDArray[np.float32]) -> NDArray[np.uint8]:
    c, w = -600.0, 1500.0
    out: NDArray[np.uint8] = np.clip((hu - (c - w / 2)) / w * 255.0, 0, 255).round().astype(
        np.uint8
    )
    return out


def _manifestation_slice(kind: str, size: int, rng: np.random.Generator,
                         seed: int) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    t = float(rng.uniform(0.35, 0.65))
    hu16, _ = phantom_slice("normal", t, size=size, rng=rng, lesion_seed=seed)
    hu = hu16.astype(np.float32)
    lung = (hu < -700) & (hu > -950)  # lung parenchyma (-860), not the air outside (-1000)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ys, xs = np.nonzero(lung)
    for _ in range(3):
        k = int(rng.integers(len(ys)))
        cy, cx = float(ys[k]), float(xs[k])
        if kind == "fibrotic_streaks":
            ang = rng.uniform(0, np.pi)
            d = np.abs((yy - cy) * np.cos(ang) - (xx - cx) * np.sin(ang))
            along = np.hypot(yy - cy, xx - cx)
            region = (d < max(1.0, size / 160)) & (along < size * 0.12) & lung
            hu[region] = rng.uniform(-100, 40)
            mask[region] = STREAK_VALUE
        else:
            r = size * rng.uniform(0.04, 0.07)
            region = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & lung
            if kind == "ground_glass_opacity":
                hu[region] = rng.uniform(-600, -450)
                mask[region] = 1
            else:
                hu[region] = rng.uniform(10, 50)
                mask[region] = 2
    hu += rng.normal(0, 10, size=hu.shape).astype(np.float32)
    # cropped inside the body like MedSeg's slices: the lungs' bounding box plus a small rim
    rows, cols = np.nonzero((hu16 < -700) & (hu16 > -950))
    rim = max(2, size // 40)
    r0, r1 = max(rows.min() - rim, 0), min(rows.max() + rim + 1, size)
    c0, c1 = max(cols.min() - rim, 0), min(cols.max() + rim + 1, size)
    return hu[r0:r1, c0:c1], mask[r0:r1, c0:c1]


def write_manifestation_set(root: Path, per_class: int = 20, size: int = 128,
                            seed: int = 0) -> Path:
    """Write synthetic manifestation slices in the MedSeg layout; returns ``root``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    kinds = ("ground_glass_opacity", "consolidation", "fibrotic_streaks")
    n = 0
    for _ in range(per_class):
        for kind in kinds:
            hu, mask = _manifestation_slice(kind, size, rng, seed * 100_000 + n)
            # stored like MedSeg: rotated 90 degrees counter-clockwise (import rotates back)
            Image.fromarray(np.rot90(_lung_window_u8(hu))).save(root / "images" / f"{n}.png")
            Image.fromarray(np.rot90(mask)).save(root / "masks" / f"{n}.png")
            rows.append([f"images/{n}.png", f"masks/{n}.png", n, kind,
                         int((mask == 1).sum()), int((mask == 2).sum()),
                         int((mask == STREAK_VALUE).sum()), f"{350.0 / size:g}"])
            n += 1
    with (root / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "medseg_index", "kind", "ggo_pixels",
                    "consolidation_pixels", "streak_pixels", "pixel_spacing"])
        w.writerows(rows)
    return root


@dataclass(frozen=True)
class SyntheticData:
    """What :func:`write_synthetic_data` wrote: both data sets and a manifest for each."""

    recognition_manifest: Path
    manifestation_manifest: Path
    recognition_rows: int
    manifestation_rows: int


def write_synthetic_data(
    out: Path,
    subjects_per_class: int = 7,
    n_slices: int = 16,
    size: int = 128,
    manifestation_per_class: int = 20,
    seed: int = 0,
) -> SyntheticData:
    """``ctdx train synthetic-data``: both sets under ``out`` plus ``recognition.csv`` and
    ``manifestation.csv``, ready for ``ctdx train reproduce smoke``.

    Refuses a non-empty ``out`` (an earlier set would mix with this one).
    """
    from ctdx.model_train.importers.dicom_table import import_dicom_table
    from ctdx.model_train.importers.medseg import import_medseg
    from ctdx.model_train.manifest import write_manifest

    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: give a new folder for the synthetic data")
    table = write_recognition_set(out / "recognition", subjects_per_class=subjects_per_class,
                                  n_slices=n_slices, size=size, seed=seed)
    rec_rows = import_dicom_table(table)
    rec_manifest = write_manifest(rec_rows, out / "recognition.csv")
    man_root = write_manifestation_set(out / "manifestation", per_class=manifestation_per_class,
                                       size=size, seed=seed)
    man_rows = import_medseg(man_root)
    man_manifest = write_manifest(man_rows, out / "manifestation.csv")
    logger.info("synthetic data in %s: %d recognition rows, %d manifestation rows", out,
                len(rec_rows), len(man_rows))
    return SyntheticData(rec_manifest, man_manifest, len(rec_rows), len(man_rows))
