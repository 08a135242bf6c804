"""Stored pixel values to Hounsfield units: one definition for training and serving.

``hu = stored * RescaleSlope + RescaleIntercept`` in float32, clipped below at
-1024 HU: padding outside the scan field (often -2000 or -3024) reads as air,
so it cannot pull the chest segmentation or the per-image normalisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

MIN_HU = -1024.0


def rescale_to_hu(stored: NDArray[Any], dataset: Any) -> NDArray[np.float32]:
    """HU of ``stored`` (a decoded frame) using ``dataset``'s rescale attributes."""
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    hu = stored.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    np.maximum(hu, MIN_HU, out=hu)
    return hu
