"""Reading a series from the spool: slice order, pixel decoding, Hounsfield units.

- **Order** is by position along the slice normal, ``ImagePositionPatient ·
  (row × column direction cosines)``: file names and InstanceNumber are not
  anatomical order on every scanner (the COVID-CT-MD files are not).
  Position ties keep InstanceNumber order.
- **Decoding** goes through pydicom's pixel backend with the plugins the
  project installs (pylibjpeg, pylibjpeg-libjpeg/-openjpeg/-rle, pyjpegls,
  gdcm): every transfer syntax the listener accepts (uncompressed, deflated,
  RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000). Whatever a
  decoder raises becomes :class:`~worker.errors.UndecodablePixelData` naming
  the SOP Instance UID: a permanent failure, not a retry.
- **Hounsfield units**: ``stored * RescaleSlope + RescaleIntercept``, per
  instance (slopes may differ between slices), clipped below at -1024 HU so
  padding outside the scan field (often -2000 or -3024 after rescale) reads
  as air, as the segmentation expects.
- **Memory** stays bounded: headers of all slices are read (no pixel data),
  then pixels are decoded ``batch_size`` slices at a time and the caller
  drops each batch when done with it; a 1000-slice study never sits in
  memory as a whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.errors import InvalidDicomError

from model_train.method.hu import rescale_to_hu
from worker.errors import InconsistentSeries, UndecodablePixelData
from worker.study import InstanceRef

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class SliceInfo:
    """One slice of the ordered series; ``index`` 0 is the first along the slice normal."""

    index: int
    sop_instance_uid: str
    path: Path
    position: float  # mm along the slice normal
    rows: int
    columns: int
    pixel_spacing_mm: float | None  # mean of PixelSpacing's two values; None without it
    pixel_area_mm2: float | None  # area of one pixel


@dataclass(frozen=True)
class OrderedSeries:
    slices: tuple[SliceInfo, ...]
    normal: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int]:
        return self.slices[0].rows, self.slices[0].columns


@dataclass(frozen=True)
class SliceBatch:
    slices: tuple[SliceInfo, ...]
    hu: NDArray[np.float32]  # (n, rows, columns)


def read_header(ref: InstanceRef) -> pydicom.Dataset:
    """The instance's attributes without pixel data; unreadable files fail the study."""
    try:
        return pydicom.dcmread(ref.path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise UndecodablePixelData(ref.sop_instance_uid, f"unreadable file ({exc})") from exc


def slice_normal(orientation: Sequence[float]) -> NDArray[np.float64]:
    """Unit normal of a slice from ImageOrientationPatient (row and column direction cosines)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise ValueError("degenerate ImageOrientationPatient")
    return normal / norm


def order_series(instances: Sequence[InstanceRef]) -> OrderedSeries:
    """Read every header and sort the slices along the normal of the first one."""
    if not instances:
        raise InconsistentSeries("the series has no instances")
    headers = [(ref, read_header(ref)) for ref in instances]
    first_ref, first = headers[0]
    try:
        normal = slice_normal([float(v) for v in first.ImageOrientationPatient])
    except (AttributeError, ValueError, TypeError) as exc:
        raise InconsistentSeries(
            f"SOP Instance {first_ref.sop_instance_uid} has no usable ImageOrientationPatient"
        ) from exc
    keyed: list[tuple[float, int, SliceInfo]] = []
    for ref, ds in headers:
        try:
            position = float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))
            rows, columns = int(ds.Rows), int(ds.Columns)
        except (AttributeError, ValueError, TypeError) as exc:
            raise InconsistentSeries(
                f"SOP Instance {ref.sop_instance_uid} lacks ImagePositionPatient, Rows or Columns"
            ) from exc
        spacing = ds.get("PixelSpacing")
        pitch = area = None
        if spacing and len(spacing) == 2:
            pitch = (float(spacing[0]) + float(spacing[1])) / 2
            area = float(spacing[0]) * float(spacing[1])
        number = ds.get("InstanceNumber")
        keyed.append(
            (
                position,
                int(number) if number is not None else 0,
                SliceInfo(0, ref.sop_instance_uid, ref.path, position, rows, columns, pitch,
                          area),
            )
        )
    keyed.sort(key=lambda item: (item[0], item[1]))
    ordered = tuple(
        SliceInfo(i, s.sop_instance_uid, s.path, s.position, s.rows, s.columns,
                  s.pixel_spacing_mm, s.pixel_area_mm2)
        for i, (_, _, s) in enumerate(keyed)
    )
    sizes = {(s.rows, s.columns) for s in ordered}
    if len(sizes) > 1:
        raise InconsistentSeries(f"slices of the series differ in size: {sorted(sizes)}")
    n = normal.tolist()
    return OrderedSeries(slices=ordered, normal=(n[0], n[1], n[2]))


def decode_hu(info: SliceInfo) -> NDArray[np.float32]:
    """One slice in Hounsfield units, float32 (rows, columns)."""
    try:
        ds = pydicom.dcmread(info.path)
        stored = ds.pixel_array
    except Exception as exc:  # decoders raise many unrelated types; all mean "cannot decode"
        raise UndecodablePixelData(info.sop_instance_uid, f"{type(exc).__name__}: {exc}") from exc
    if stored.shape != (info.rows, info.columns):
        raise UndecodablePixelData(
            info.sop_instance_uid,
            f"decoded shape {stored.shape} is not Rows x Columns {(info.rows, info.columns)}",
        )
    hu = rescale_to_hu(stored, ds)
    return hu


def iter_batches(
    series: OrderedSeries, batch_size: int, decode_threads: int = 1
) -> Iterator[SliceBatch]:
    """Decode the ordered series ``batch_size`` slices at a time.

    ``decode_threads`` > 1 decodes a batch's slices in a thread pool (the
    JPEG decoders release the GIL); memory still holds one batch.
    """
    rows, columns = series.shape
    pool = ThreadPoolExecutor(decode_threads) if decode_threads > 1 else None
    try:
        for start in range(0, len(series.slices), batch_size):
            chunk = series.slices[start : start + batch_size]
            out = np.empty((len(chunk), rows, columns), dtype=np.float32)
            images = pool.map(decode_hu, chunk) if pool else map(decode_hu, chunk)
            for i, image in enumerate(images):
                out[i] = image
            yield SliceBatch(slices=chunk, hu=out)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
