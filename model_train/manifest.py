"""The labelled-data manifest: one CSV row per slice image or per DICOM series.

Every training input goes through a manifest, whatever the source layout, so
splitting, caching and training see one format. Importers
(:mod:`ctdx.model_train.importers`) write manifests; people can write them by hand.

Columns (header required, order free; unknown columns are an error so a typo
is not silently ignored):

``subject`` (required)
    Person the images come from. Splits never put one subject in two sets.
``study`` (required)
    One CT examination of that subject; the unit of the study-level decision.
``series`` (optional)
    Series identifier (e.g. SeriesInstanceUID), kept for the data summary.
``path`` (required)
    A DICOM file, a PNG/JPEG slice image, or a directory holding one DICOM
    series (all its slices get the row's labels). Relative paths are relative
    to the manifest's directory.
``class`` (required)
    Recognition class: ``covid19``, ``other_pneumonia`` or ``normal``.
``manifestation`` (optional)
    ``ground_glass_opacity``, ``consolidation`` or ``fibrotic_streaks``; only
    on ``covid19`` slices. Rows with it form the manifestation data set.
``slice_label`` (optional)
    ``1`` when the slice shows the class's abnormality, ``0`` when it does not;
    only on file rows. See :data:`SlicePolicy` for how training uses it.
``rotate`` (optional)
    Degrees (0, 90, 180, 270) to rotate a slice image clockwise so that it is
    anterior-up; DICOM is never rotated.
``window_center``, ``window_width`` (optional, together)
    For 8-bit slice images only: the display window the image was exported
    with, used to map grey values back to approximate Hounsfield units
    (:mod:`ctdx.model_train.sources`). Default: the lung window -600 / 1500.
``pixel_spacing`` (optional)
    For slice images only: millimetres per pixel, which the lung segmentation
    uses to size its morphology (DICOM files carry PixelSpacing). Default: the
    segmentation's default spacing.
``cropped`` (optional, ``0``/``1``)
    For slice images cropped inside the body (MedSeg): the segmentation's chest
    step needs air around the body, so it runs on the image framed by soft
    tissue and air (:mod:`ctdx.model_train.cache`); the network input is unchanged.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ctdx.model_train.method.classes import MANIFESTATION_CLASSES, RECOGNITION_CLASSES

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("subject", "study", "path", "class")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "series",
    "manifestation",
    "slice_label",
    "rotate",
    "window_center",
    "window_width",
    "pixel_spacing",
    "cropped",
)
COLUMNS: tuple[str, ...] = (
    "subject",
    "study",
    "series",
    "path",
    "class",
    "manifestation",
    "slice_label",
    "rotate",
    "window_center",
    "window_width",
    "pixel_spacing",
    "cropped",
)
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

SlicePolicy = Literal["all", "lesion_only", "slice_labels"]
"""How slice labels shape the recognition data set.

``all``: every slice carries its study's class (the paper's image counts suggest
this). ``lesion_only``: slices labelled ``0`` in a ``covid19`` or
``other_pneumonia`` study are left out, because a lesion-free slice of a
pneumonia patient looks normal and would teach the network that normal lung is
pneumonia; slices without a label are kept. Normal studies are never filtered.
``slice_labels``: every slice is kept and a slice labelled ``0`` in a
``covid19`` or ``other_pneumonia`` study is labelled ``normal`` (what it shows), so
the network also sees the lesion-free slices of pneumonia patients; unlabelled
slices keep their study's class. The study-level evaluation never uses a policy.
"""

SLICE_POLICIES: tuple[str, ...] = ("all", "lesion_only", "slice_labels")


class ManifestError(ValueError):
    """The manifest cannot be used; the message names the file, line and column."""


@dataclass(frozen=True)
class ManifestRow:
    """One labelled slice image, DICOM slice, or DICOM series directory."""

    subject: str
    study: str
    path: Path
    label: str
    series: str = ""
    manifestation: str | None = None
    slice_label: bool | None = None
    rotate: int = 0
    window: tuple[float, float] | None = None
    pixel_spacing: float | None = None
    cropped: bool = False

    @property
    def is_series(self) -> bool:
        """True when ``path`` is a directory holding a whole DICOM series."""
        return self.path.is_dir()

    @property
    def is_image(self) -> bool:
        """True for 8-bit slice images (PNG/JPEG...), which carry no Hounsfield units."""
        return self.path.suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class Manifest:
    """Validated rows; paths are absolute."""

    rows: tuple[ManifestRow, ...]
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(sorted({r.subject for r in self.rows}))

    @property
    def studies(self) -> tuple[str, ...]:
        return tuple(sorted({r.study for r in self.rows}))

    def subject_class(self) -> dict[str, str]:
        """One class per subject for stratification: the most abnormal class it has.

        A subject with any COVID-19 study counts as COVID-19, then other
        pneumonia, then normal, so a rare class is never hidden by a
        follow-up scan.
        """
        rank: dict[str, int] = {c: i for i, c in enumerate(RECOGNITION_CLASSES)}
        out: dict[str, str] = {}
        for r in self.rows:
            cur = out.get(r.subject)
            if cur is None or rank[r.label] < rank[cur]:
                out[r.subject] = r.label
        return out

    def manifestation_rows(self) -> Manifest:
        """The rows of the manifestation task (those with a manifestation)."""
        return Manifest(tuple(r for r in self.rows if r.manifestation), self.source)

    def select_subjects(self, subjects: Iterable[str]) -> Manifest:
        wanted = set(subjects)
        return Manifest(tuple(r for r in self.rows if r.subject in wanted), self.source)

    def summary(self) -> dict[str, object]:
        """Counts for the report's data summary (no identifiers)."""
        cls = Counter(r.label for r in self.rows)
        subj_cls = Counter(self.subject_class().values())
        study_cls = Counter({r.study: r.label for r in self.rows}.values())
        man = Counter(r.manifestation for r in self.rows if r.manifestation)
        return {
            "rows": len(self.rows),
            "subjects": len(self.subjects),
            "studies": len(self.studies),
            "series_rows": sum(1 for r in self.rows if r.is_series),
            "image_rows": sum(1 for r in self.rows if r.is_image),
            "rows_per_class": {c: cls.get(c, 0) for c in RECOGNITION_CLASSES},
            "subjects_per_class": {c: subj_cls.get(c, 0) for c in RECOGNITION_CLASSES},
            "studies_per_class": {c: study_cls.get(c, 0) for c in RECOGNITION_CLASSES},
            "rows_per_manifestation": {m: man.get(m, 0) for m in MANIFESTATION_CLASSES},
            "slice_labels": {
                "positive": sum(1 for r in self.rows if r.slice_label is True),
                "negative": sum(1 for r in self.rows if r.slice_label is False),
                "missing": sum(1 for r in self.rows if r.slice_label is None),
            },
        }


def apply_slice_policy(manifest: Manifest, policy: SlicePolicy) -> Manifest:
    """Filter recognition rows by their slice label (see :data:`SlicePolicy`)."""
    if policy == "all":
        return manifest
    if policy == "slice_labels":
        return Manifest(tuple(
            replace(r, label="normal") if r.label != "normal" and r.slice_label is False else r
            for r in manifest.rows), manifest.source)
    if policy != "lesion_only":
        raise ManifestError(f"slice policy must be one of {', '.join(SLICE_POLICIES)}, "
                            f"not {policy!r}")
    kept = tuple(
        r
        for r in manifest.rows
        if not (r.label != "normal" and r.slice_label is False)
    )
    return Manifest(kept, manifest.source)


# --- reading and writing --------------------------------------------------------------


def _fail(where: str, msg: str) -> ManifestError:
    return ManifestError(f"{where}: {msg}")


def _parse_row(raw: dict[str, str], where: str, base: Path, check_paths: bool) -> ManifestRow:
    def get(col: str) -> str:
        return (raw.get(col) or "").strip()

    for col in REQUIRED_COLUMNS:
        if not get(col):
            raise _fail(where, f"column '{col}' is empty")
    label = get("class")
    if label not in RECOGNITION_CLASSES:
        raise _fail(where, f"class {label!r} is not one of {', '.join(RECOGNITION_CLASSES)}")
    path = Path(get("path"))
    if not path.is_absolute():
        path = base / path
    if check_paths and not path.exists():
        raise _fail(where, f"path {get('path')!r} does not exist (relative to {base})")
    manifestation = get("manifestation") or None
    if manifestation is not None:
        if manifestation not in MANIFESTATION_CLASSES:
            raise _fail(
                where,
                f"manifestation {manifestation!r} is not one of {', '.join(MANIFESTATION_CLASSES)}",
            )
        if label != "covid19":
            raise _fail(where, f"manifestation given on a {label!r} row (only covid19 has them)")
    slice_text = get("slice_label")
    slice_label: bool | None
    if slice_text == "":
        slice_label = None
    elif slice_text in ("0", "1"):
        slice_label = slice_text == "1"
    else:
        raise _fail(where, f"slice_label must be 0, 1 or empty, not {slice_text!r}")
    if slice_label is not None and check_paths and path.is_dir():
        raise _fail(where, "slice_label given on a series directory (label one file per row)")
    rotate_text = get("rotate") or "0"
    try:
        rotate = int(rotate_text)
    except ValueError:
        raise _fail(where, f"rotate must be 0, 90, 180 or 270, not {rotate_text!r}") from None
    if rotate not in (0, 90, 180, 270):
        raise _fail(where, f"rotate must be 0, 90, 180 or 270, not {rotate}")
    wc, ww = get("window_center"), get("window_width")
    window: tuple[float, float] | None = None
    if wc or ww:
        if not (wc and ww):
            raise _fail(where, "window_center and window_width must be given together")
        try:
            window = (float(wc), float(ww))
        except ValueError:
            raise _fail(where, f"window {wc!r}/{ww!r} is not numeric") from None
        if window[1] <= 0:
            raise _fail(where, f"window_width must be positive, not {ww}")
    spacing_text = get("pixel_spacing")
    pixel_spacing: float | None = None
    if spacing_text:
        try:
            pixel_spacing = float(spacing_text)
        except ValueError:
            raise _fail(where, f"pixel_spacing {spacing_text!r} is not numeric") from None
        if not pixel_spacing > 0:
            raise _fail(where, f"pixel_spacing must be positive, not {spacing_text}")
    cropped_text = get("cropped") or "0"
    if cropped_text not in ("0", "1"):
        raise _fail(where, f"cropped must be 0, 1 or empty, not {cropped_text!r}")
    return ManifestRow(
        subject=get("subject"),
        study=get("study"),
        series=get("series"),
        path=path,
        label=label,
        manifestation=manifestation,
        slice_label=slice_label,
        rotate=rotate,
        window=window,
        pixel_spacing=pixel_spacing,
        cropped=cropped_text == "1",
    )


def validate_rows(rows: Sequence[ManifestRow], name: str = "manifest") -> Manifest:
    """Check the cross-row rules; raise :class:`ManifestError` on the first problem.

    A study belongs to one subject and has one class; a path appears once.
    """
    if not rows:
        raise ManifestError(f"{name}: no rows")
    study_subject: dict[str, str] = {}
    study_class: dict[str, str] = {}
    seen: set[Path] = set()
    for i, r in enumerate(rows):
        where = f"{name} row {i + 1}"
        if study_subject.setdefault(r.study, r.subject) != r.subject:
            raise _fail(where, f"study {r.study!r} appears under two subjects")
        if study_class.setdefault(r.study, r.label) != r.label:
            raise _fail(
                where,
                f"study {r.study!r} has rows of class {study_class[r.study]!r} and {r.label!r}",
            )
        if r.path in seen:
            raise _fail(where, f"path {str(r.path)!r} appears twice")
        seen.add(r.path)
    return Manifest(tuple(rows))


def read_manifest(path: Path, check_paths: bool = True) -> Manifest:
    """Read and validate a manifest CSV."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    base = path.parent.absolute()
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
        unknown = [c for c in header if c not in COLUMNS]
        if unknown:
            raise ManifestError(
                f"{path}: unknown column(s) {', '.join(unknown)}; allowed: {', '.join(COLUMNS)}"
            )
        rows = [
            _parse_row({k.strip(): v for k, v in raw.items() if k is not None},
                       f"{path}:{reader.line_num}", base, check_paths)
            for raw in reader
        ]
    manifest = validate_rows(rows, str(path))
    logger.info(
        "manifest %s: %d rows, %d subjects, %d studies",
        path, len(manifest), len(manifest.subjects), len(manifest.studies),
    )
    return replace(manifest, source=path.absolute())


def write_manifest(manifest: Manifest | Sequence[ManifestRow], path: Path,
                   relative: bool = True) -> Path:
    """Write rows as CSV; paths are written relative to the file's folder when possible."""
    rows = manifest.rows if isinstance(manifest, Manifest) else tuple(manifest)
    validate_rows(rows, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.absolute()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for r in rows:
            p = r.path.absolute()
            if relative:
                try:
                    p = p.relative_to(base)
                except ValueError:
                    pass
            writer.writerow([
                r.subject,
                r.study,
                r.series,
                p.as_posix(),
                r.label,
                r.manifestation or "",
                "" if r.slice_label is None else int(r.slice_label),
                r.rotate or "",
                "" if r.window is None else f"{r.window[0]:g}",
                "" if r.window is None else f"{r.window[1]:g}",
                "" if r.pixel_spacing is None else f"{r.pixel_spacing:g}",
                1 if r.cropped else "",
            ])
    tmp.replace(path)
    return path
