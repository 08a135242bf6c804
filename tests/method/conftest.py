"""Helpers for the method tests: real series from ``../shared/data`` as HU volumes."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

#: name -> folder under ``shared/data`` holding one axial CT series.
REAL_SERIES = {
    "covid19": "covid-ct-md/COVID-19/P001",
    "cap": "covid-ct-md/CAP/cap001",
    "normal": "covid-ct-md/Normal/normal001",
    "lung-pet-b70f": "lung-pet-ct-dx/Lung_Dx-A0002/series2_ThoraxRoutine_8mm_B70f",
}

Series = tuple[NDArray[np.float32], float]


@cache
def _read_series(folder: Path) -> Series:
    """HU volume, head first (sorted by ImagePositionPatient z, not file name), and spacing."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.rglob("*")) if p.is_file()]
    datasets = [ds for ds in datasets if "PixelData" in ds]
    datasets.sort(key=lambda ds: -float(ds.ImagePositionPatient[2]))
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    ).astype(np.float32)
    return hu, float(datasets[0].PixelSpacing[0])


@pytest.fixture(scope="session")
def real_series(shared_data: Path) -> Callable[[str], Series]:
    """``real_series(name)`` -> (HU volume (N, H, W) float32, pixel spacing mm)."""

    def load(name: str) -> Series:
        folder = shared_data / REAL_SERIES[name]
        if not folder.is_dir():
            pytest.skip(f"{folder} not available")
        return _read_series(folder)

    return load
