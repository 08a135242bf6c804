"""From manifest rows to Hounsfield-unit slices: the only place training reads pixels.

- **DICOM** files are decoded with pydicom (compressed transfer syntaxes through
  the pylibjpeg / gdcm plugins) and rescaled to HU (RescaleSlope /
  RescaleIntercept, clipped below at -1024), exactly as the worker does for
  received instances.
- **Series directories** expand to one slice per DICOM file in them.
- **8-bit slice images** (PNG/JPEG of CC-CCII, COVID-CT, MedSeg) carry no HU. The
  grey value ``g`` (0..255) of an image exported with display window
  ``(c, w)`` is mapped back linearly: ``hu = c - w / 2 + g / 255 * w`` (default
  lung window -600 / 1500: black -1350, white +150 HU). Values outside the
  export window were clipped by the exporter and stay clipped. The image is
  first rotated clockwise by the row's ``rotate``. Images cropped inside the
  body are marked ``cropped`` and get a frame for the segmentation only
  (:func:`ctdx.model_train.cache.prepare_slices`). After that the shared
  segmentation and preprocessing run unchanged, so the lung threshold of
  -850 HU falls at grey 85; how well the lung mask works on such images is the
  data set's caveat, not a second preprocessing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image

from ctdx.model_train.manifest import IMAGE_SUFFIXES, ManifestRow
from ctdx.model_train.method.hu import MIN_HU, rescale_to_hu

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_WINDOW: tuple[float, float] = (-600.0, 1500.0)


class SourceError(ValueError):
    """A slice cannot be read or converted to HU; the message names the file."""


@dataclass(frozen=True)
class SliceSource:
    """One slice to preprocess: the file, how to read it, and the manifest row it came from."""

    path: Path
    row: int  # index into the manifest's rows
    rotate: int = 0
    window: tuple[float, float] | None = None
    pixel_spacing: float | None = None  # images only; DICOM files carry their own
    cropped: bool = False  # images cropped inside the body (see model_train.cache)

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_SUFFIXES


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix or not path.is_file():
        return False
    with path.open("rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"


def expand_rows(rows: Sequence[ManifestRow]) -> tuple[SliceSource, ...]:
    """One :class:`SliceSource` per slice; series directories become their files (sorted)."""
    out: list[SliceSource] = []
    for i, r in enumerate(rows):
        if r.path.is_dir():
            files = sorted(p for p in r.path.iterdir() if p.is_file() and _is_dicom_file(p))
            if not files:
                raise SourceError(f"{r.path}: series directory without DICOM files")
            out.extend(SliceSource(p, i) for p in files)
        else:
            out.append(SliceSource(r.path, i, r.rotate, r.window, r.pixel_spacing, r.cropped))
    return tuple(out)


@dataclass(frozen=True)
class LoadedSlice:
    hu: NDArray[np.float32]  # (rows, columns)
    spacing_mm: float | None  # row spacing in mm (square pixels assumed); None = unknown
    cropped: bool = False


def dicom_slice(path: Path) -> LoadedSlice:
    """Hounsfield units and pixel spacing of a single-frame CT DICOM file.

    HU are computed as the worker computes them: ``stored * RescaleSlope +
    RescaleIntercept`` in float32, clipped below at -1024 HU (padding outside the
    scan field reads as air): ``ctdx.model_train.method.hu.rescale_to_hu``, the one
    definition the worker's ``ctdx.worker.loading.decode_hu`` uses too.
    """
    try:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for unreadable or undecodable files
        raise SourceError(f"{path}: cannot decode DICOM pixels ({exc})") from exc
    if stored.ndim != 2:
        raise SourceError(f"{path}: expected one 2-D frame, got shape {stored.shape}")
    hu = rescale_to_hu(stored, ds)
    spacing: float | None = None
    try:
        value = ds.get("PixelSpacing")
        spacing = float(value[0]) if value else None
    except (ValueError, TypeError, IndexError):
        spacing = None
    return LoadedSlice(hu, spacing if spacing and spacing > 0 else None)


def dicom_hu(path: Path) -> NDArray[np.float32]:
    """Hounsfield units of a DICOM file (see :func:`dicom_slice`)."""
    return dicom_slice(path).hu


def image_hu(path: Path, rotate: int = 0,
             window: tuple[float, float] | None = None) -> NDArray[np.float32]:
    """Approximate HU of an 8-bit windowed slice image (see the module doc)."""
    try:
        with Image.open(path) as img:
            grey = np.asarray(img.convert("L"), dtype=np.float32)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read image ({exc})") from exc
    if rotate:
        grey = np.rot90(grey, k=-(rotate // 90))  # negative k: clockwise
    c, w = window or DEFAULT_IMAGE_WINDOW
    hu = np.ascontiguousarray(c - w / 2.0 + grey / 255.0 * w, dtype=np.float32)
    np.maximum(hu, MIN_HU, out=hu)
    return hu


def load_slice(source: SliceSource) -> LoadedSlice:
    """The slice in HU, (rows, columns) float32, and its pixel spacing."""
    if source.is_image:
        return LoadedSlice(image_hu(source.path, source.rotate, source.window),
                           source.pixel_spacing, source.cropped)
    return dicom_slice(source.path)
