"""Lung segmentation, scikit-image reference implementation (one slice at a time).

Paper ("Data Preprocessing", Fig. 2): binarise at -850 HU; erosion, opening,
closing, remove_small_objects and FloodFill so that "contents outside the chest
are excluded"; then "another threshold range of (-850, 0) HU", erosion, closing
and remove_small_objects to keep the lung; the original HU are mapped into the
resulting region. How each ambiguous step is read here (reasons and evidence in
``docs/method.md``):

Step 1, the chest mask
    - Foreground is *tissue*: ``hu > -850`` (air outside the body is about
      -1000 HU, so -850 separates the body from the air around it).
    - Erosion by a disk of 1 mm, opening and closing by disks of 2 mm: detach and
      remove the thin couch, blankets and noise, smooth the outline.
    - remove_small_objects: only the largest 4-connected object is kept (the
      body; arms, couch and cables go). A fixed minimum size would keep a
      large couch that, with the back, can enclose air that looks like lung.
    - FloodFill: the background (4-connected) is flooded from every image border
      pixel; whatever the flood does not reach is inside the chest. The chest mask
      is the body *with* everything it encloses (lungs, airways), eroded by a
      margin of 5 mm (our addition): air trapped between the skin and the
      mattress or clothing would otherwise be enclosed and look like lung, while
      the chest wall keeps the lungs more than 5 mm inside the skin.

Step 2, the lung mask
    - Foreground is *air-containing lung inside the chest*: ``chest & (hu <
      lung_max_hu)`` with ``lung_max_hu = -320``. The literal range (-850, 0)
      cannot be the lung: on all five real series here the median lung HU is
      -802..-868, so a lower bound of -850 drops about half of normal lung, and
      an upper bound of 0 admits fat (about -100 HU) as lung. -320 lies above
      ground glass (-700..-300 for the most part) and well below fat.
    - Erosion by 1 mm (drops the partial-volume rim at the pleura and thin
      leaks), closing by 5 mm (bridges vessels and small dense lesions at the
      lung edge), remove_small_objects of 100 mm² or less (4-connected).
    - Our addition: holes are filled (flood fill of the background from the image
      border, 4-connected), so vessels, nodules and consolidation *enclosed* by
      lung belong to the lung — "mapping the original HU into the region" means the
      classifier must see those lesions. Dense lesions that reach the chest wall
      are not holes and are recovered only as far as the 5 mm closing reaches: a
      known limitation of a threshold method (a lobar consolidation is lost).
    - The trachea and main bronchi inside the chest are air and stay in the mask
      (the paper removes nothing else); so does bowel gas under the diaphragm when
      the body encloses it. Both are small next to the lungs.

Sizes are in millimetres and converted to pixels with the slice's pixel spacing
(:func:`pixel_params`), so a 350 mm and a 500 mm field of view are treated
alike. Footprints are scikit-image's ``disk(r)`` (``dx² + dy² <= r²``), applied
with ``scipy.ndimage.binary_erosion`` / ``binary_dilation`` — the calls that
scikit-image's own ``binary_erosion`` etc. make (deprecated there since 0.26).
Pixels outside the image are ignored by every operator (``mode="ignore"``:
erosion does not eat from the image border, dilation does not grow from it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage import morphology

logger = logging.getLogger(__name__)

#: 4-connectivity in 2-D, used for every connected-component step.
CROSS_2D = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class SegmentationParams:
    """Thresholds (HU) and sizes (mm, mm²) of the lung segmentation; see the module doc."""

    body_threshold_hu: float = -850.0
    body_erosion_mm: float = 1.0
    body_opening_mm: float = 2.0
    body_closing_mm: float = 2.0
    chest_margin_mm: float = 5.0
    lung_max_hu: float = -320.0
    lung_erosion_mm: float = 1.0
    lung_closing_mm: float = 5.0
    lung_min_area_mm2: float = 100.0
    fill_lung_holes: bool = True
    default_spacing_mm: float = 0.7  # used when a slice's pixel spacing is unknown

    def __post_init__(self) -> None:
        for name in ("body_erosion_mm", "body_opening_mm", "body_closing_mm", "chest_margin_mm",
                     "lung_erosion_mm", "lung_closing_mm", "lung_min_area_mm2"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.default_spacing_mm <= 0:
            raise ValueError(f"default_spacing_mm must be positive, got {self.default_spacing_mm}")
        if not self.body_threshold_hu < self.lung_max_hu:
            raise ValueError("body_threshold_hu must be below lung_max_hu")


@dataclass(frozen=True)
class PixelParams:
    """:class:`SegmentationParams` in pixels for one pixel spacing (shared by both versions)."""

    body_threshold_hu: float
    body_erosion: int
    body_opening: int
    body_closing: int
    chest_margin: int
    lung_max_hu: float
    lung_erosion: int
    lung_closing: int
    lung_min_area: int  # objects of this many pixels or fewer are removed
    fill_lung_holes: bool


def pixel_params(params: SegmentationParams, spacing_mm: float | None = None) -> PixelParams:
    """Radii rounded to whole pixels, areas to whole pixels, for ``spacing_mm`` (square pixels)."""
    spacing = params.default_spacing_mm if spacing_mm is None else float(spacing_mm)
    if not math.isfinite(spacing) or spacing <= 0:
        raise ValueError(f"pixel spacing must be positive, got {spacing_mm}")

    def radius(mm: float) -> int:
        return int(round(mm / spacing))

    return PixelParams(
        body_threshold_hu=params.body_threshold_hu,
        body_erosion=radius(params.body_erosion_mm),
        body_opening=radius(params.body_opening_mm),
        body_closing=radius(params.body_closing_mm),
        chest_margin=radius(params.chest_margin_mm),
        lung_max_hu=params.lung_max_hu,
        lung_erosion=radius(params.lung_erosion_mm),
        lung_closing=radius(params.lung_closing_mm),
        lung_min_area=int(round(params.lung_min_area_mm2 / spacing**2)),
        fill_lung_holes=params.fill_lung_holes,
    )


def _footprint(r: int) -> NDArray[np.bool_]:
    footprint: NDArray[np.bool_] = morphology.disk(r).astype(np.bool_)  # type: ignore[no-untyped-call]
    return footprint


def _erode(mask: NDArray[np.bool_], r: int) -> NDArray[np.bool_]:
    if r <= 0:
        return mask
    return np.asarray(ndi.binary_erosion(mask, _footprint(r), border_value=1), dtype=bool)


def _dilate(mask: NDArray[np.bool_], r: int) -> NDArray[np.bool_]:
    if r <= 0:
        return mask
    return np.asarray(ndi.binary_dilation(mask, _footprint(r), border_value=0), dtype=bool)


def _open(mask: NDArray[np.bool_], r: int) -> NDArray[np.bool_]:
    return _dilate(_erode(mask, r), r)


def _close(mask: NDArray[np.bool_], r: int) -> NDArray[np.bool_]:
    return _erode(_dilate(mask, r), r)


def _largest_object(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    labels, n = ndi.label(mask, structure=CROSS_2D)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(labels == int(np.argmax(sizes)), dtype=bool)


def _fill_from_border(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Flood the background from the image border; everything not reached is inside."""
    return np.asarray(ndi.binary_fill_holes(mask, structure=CROSS_2D), dtype=bool)


def chest_mask(hu: NDArray[np.floating], p: PixelParams) -> NDArray[np.bool_]:
    """Step 1: the body and everything it encloses."""
    body = np.asarray(hu > p.body_threshold_hu)
    body = _erode(body, p.body_erosion)
    body = _open(body, p.body_opening)
    body = _close(body, p.body_closing)
    body = _largest_object(body)
    return _erode(_fill_from_border(body), p.chest_margin)


def lung_mask_in_chest(
    hu: NDArray[np.floating], chest: NDArray[np.bool_], p: PixelParams
) -> NDArray[np.bool_]:
    """Step 2: air-containing lung inside the chest, cleaned, holes filled."""
    lung = chest & np.asarray(hu < p.lung_max_hu)
    lung = _erode(lung, p.lung_erosion)
    lung = _close(lung, p.lung_closing)
    lung = np.asarray(
        morphology.remove_small_objects(lung, max_size=p.lung_min_area, connectivity=1),
        dtype=bool,
    )
    if p.fill_lung_holes:
        lung = _fill_from_border(lung)
    return lung


def segment_lungs(
    hu: NDArray[np.floating],
    params: SegmentationParams | None = None,
    spacing_mm: float | None = None,
) -> NDArray[np.bool_]:
    """Lung mask ``(H, W)`` bool of one axial slice in Hounsfield units (the reference).

    ``spacing_mm``: the slice's pixel spacing (``PixelSpacing``, square pixels);
    ``None`` uses ``params.default_spacing_mm``.
    """
    arr = np.asarray(hu, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"hu must be (H, W), got shape {arr.shape}")
    p = pixel_params(params or SegmentationParams(), spacing_mm)
    return lung_mask_in_chest(arr, chest_mask(arr, p), p)
