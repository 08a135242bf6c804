"""Reading a series from the spool: slice order, pixel decoding, Hounsfield units.

A series is either classic (CT Image Storage: one slice per instance) or
enhanced (Enhanced CT Image Storage, or its Legacy Converted form: one
multi-frame instance holds many slices, each frame described by the
functional groups). Both become the same ordered list of :class:`SliceInfo`,
one per slice; an enhanced slice carries its 1-based ``frame_number``.

- **Geometry** of a classic slice comes from its top-level attributes; of a
  frame, from ``PerFrameFunctionalGroupsSequence[i]``, falling back to
  ``SharedFunctionalGroupsSequence`` where the macro is shared: Plane Position
  (``ImagePositionPatient``), Plane Orientation (``ImageOrientationPatient``),
  Pixel Measures (``PixelSpacing``, ``SliceThickness``), Pixel Value
  Transformation (``RescaleSlope``/``RescaleIntercept``).
- **Order** is by position along the slice normal, ``ImagePositionPatient ·
  (row × column direction cosines)``: file names, InstanceNumber and frame
  order are not anatomical order on every scanner (the COVID-CT-MD files are
  not). Position ties keep InstanceNumber (then frame) order.
- **Localisers** (CT Image Type value 3 ``LOCALIZER``, PS3.3 C.8.2.1.1.1) that
  a scanner put in the axial series (often its first or last instance) are
  left out of a series that has other instances, and said in the log; a series
  of localisers only is refused by series selection.
- **Consistency**: every slice must have the same Rows x Columns and the same
  orientation (within 1e-3 of each direction cosine), else
  :class:`~worker.errors.InconsistentSeries`. A series that mixes classic
  single-frame and multi-frame instances is refused the same way, as is a
  multi-frame instance without functional groups.
- **Decoding** goes through pydicom's pixel backend with the plugins the
  project installs (pylibjpeg, pylibjpeg-libjpeg/-openjpeg/-rle, pyjpegls,
  gdcm): every transfer syntax the listener accepts (uncompressed, deflated,
  RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000). Frames are read
  with ``pydicom.pixels.iter_pixels(path, indices=...)``: only the frames of
  the current batch are decoded, never the whole multi-frame instance.
  Whatever a decoder raises becomes :class:`~worker.errors.UndecodablePixelData`
  naming the SOP Instance UID (and frame): a permanent failure, not a retry.
- **Hounsfield units**: ``stored * RescaleSlope + RescaleIntercept``, per
  instance or per frame (slopes may differ between slices), clipped below at
  -1024 HU so padding outside the scan field (often -2000 or -3024 after
  rescale) reads as air, as the segmentation expects.
- **Memory** stays bounded: headers of all instances are read (no pixel data),
  then pixels are decoded ``batch_size`` slices at a time and the caller
  drops each batch when done with it; a 1000-slice study, classic or one
  1000-frame instance, never sits in memory as a whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import iter_pixels

from ctdx.model_train.method.hu import rescale_to_hu
from ctdx.worker.errors import InconsistentSeries, UndecodablePixelData
from ctdx.worker.study import InstanceRef

logger = logging.getLogger(__name__)

#: Multi-frame CT SOP classes whose frames are described by functional groups.
ENHANCED_CT_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
})

#: Largest difference of a direction cosine between slices that still counts as the same
#: orientation.
ORIENTATION_TOLERANCE = 1e-3


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
    frame_number: int | None = None  # 1-based frame of a multi-frame instance; None: single
    rescale: tuple[float, float] | None = None  # (slope, intercept) of a frame; None: the file's

    def label(self) -> str:
        """The slice as an operator finds it: SOP Instance UID, and frame when multi-frame."""
        if self.frame_number is None:
            return self.sop_instance_uid
        return f"{self.sop_instance_uid} frame {self.frame_number}"


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


def is_multiframe(ds: pydicom.Dataset) -> bool:
    """More than one frame, or frames described by functional groups (even a single one)."""
    frames = ds.get("NumberOfFrames")
    many = frames not in (None, "") and int(frames) > 1
    return many or "SharedFunctionalGroupsSequence" in ds or (
        "PerFrameFunctionalGroupsSequence" in ds
    )


def is_enhanced(ds: pydicom.Dataset) -> bool:
    """An Enhanced (or Legacy Converted Enhanced) CT instance with functional groups."""
    return "PerFrameFunctionalGroupsSequence" in ds and (
        str(ds.get("SOPClassUID", "")) in ENHANCED_CT_SOP_CLASSES
        or "SharedFunctionalGroupsSequence" in ds
    )


def functional_group(ds: pydicom.Dataset, frame: int, macro: str) -> pydicom.Dataset | None:
    """The first item of functional group ``macro`` (a sequence keyword) for 0-based ``frame``.

    Per-frame groups win over shared ones, as PS3.3 C.7.6.16 says: a macro is
    in one of the two, never both.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        seq = per_frame[frame].get(macro)
        if seq:
            return seq[0]  # type: ignore[no-any-return]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(macro)
        if seq:
            return seq[0]  # type: ignore[no-any-return]
    return None


def frame_count(ds: pydicom.Dataset) -> int:
    frames = ds.get("NumberOfFrames")
    return int(frames) if frames not in (None, "") else 1


@dataclass(frozen=True)
class _Geometry:
    """Where one slice lies, as the header states it."""

    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    spacing: tuple[float, float] | None
    thickness: float | None
    rescale: tuple[float, float] | None


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _spacing(values: Any) -> tuple[float, float] | None:
    if values and len(values) == 2:
        return float(values[0]), float(values[1])
    return None


def frame_geometry(ds: pydicom.Dataset, frame: int, where: str) -> _Geometry:
    """Geometry of 0-based ``frame`` of an enhanced instance, from its functional groups."""
    position = functional_group(ds, frame, "PlanePositionSequence")
    orientation = functional_group(ds, frame, "PlaneOrientationSequence")
    try:
        assert position is not None and orientation is not None
        ipp = _floats(position.ImagePositionPatient)
        iop = _floats(orientation.ImageOrientationPatient)
        if len(ipp) != 3 or len(iop) != 6:
            raise ValueError("wrong number of values")
    except (AssertionError, AttributeError, ValueError, TypeError) as exc:
        raise InconsistentSeries(
            f"{where} has no usable Plane Position / Plane Orientation functional group "
            "(ImagePositionPatient, ImageOrientationPatient)"
        ) from exc
    measures = functional_group(ds, frame, "PixelMeasuresSequence")
    spacing = thickness = None
    if measures is not None:
        spacing = _spacing(measures.get("PixelSpacing"))
        value = measures.get("SliceThickness")
        thickness = float(value) if value not in (None, "") else None
    transform = functional_group(ds, frame, "PixelValueTransformationSequence")
    rescale = None
    if transform is not None and "RescaleSlope" in transform:
        rescale = (
            float(transform.get("RescaleSlope", 1.0) or 1.0),
            float(transform.get("RescaleIntercept", 0.0) or 0.0),
        )
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:  # legacy converted files may keep them
        rescale = (
            float(ds.get("RescaleSlope", 1.0) or 1.0),
            float(ds.get("RescaleIntercept", 0.0) or 0.0),
        )
    return _Geometry((ipp[0], ipp[1], ipp[2]), iop, spacing, thickness, rescale or (1.0, 0.0))


def _classic_geometry(ds: pydicom.Dataset, where: str) -> _Geometry:
    try:
        ipp = _floats(ds.ImagePositionPatient)
        iop = _floats(ds.ImageOrientationPatient)
        if len(ipp) != 3 or len(iop) != 6:
            raise ValueError("wrong number of values")
    except (AttributeError, ValueError, TypeError) as exc:
        raise InconsistentSeries(
            f"SOP Instance {where} lacks ImagePositionPatient or ImageOrientationPatient"
        ) from exc
    value = ds.get("SliceThickness")
    thickness = float(value) if value not in (None, "") else None
    return _Geometry((ipp[0], ipp[1], ipp[2]), iop, _spacing(ds.get("PixelSpacing")), thickness,
                     None)


def _slices_of(ref: InstanceRef, ds: pydicom.Dataset) -> list[tuple[_Geometry, int | None]]:
    """(geometry, 1-based frame number or None) of every slice an instance holds."""
    if not is_multiframe(ds):
        return [(_classic_geometry(ds, ref.sop_instance_uid), None)]
    if not is_enhanced(ds):
        raise InconsistentSeries(
            f"SOP Instance {ref.sop_instance_uid} has {frame_count(ds)} frames but no "
            "functional groups (only Enhanced CT multi-frame instances can be analysed)"
        )
    frames = frame_count(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames:
        raise InconsistentSeries(
            f"SOP Instance {ref.sop_instance_uid}: NumberOfFrames is {frames} but the "
            f"Per-Frame Functional Groups Sequence has {len(per_frame)} items"
        )
    return [
        (frame_geometry(ds, i, f"SOP Instance {ref.sop_instance_uid} frame {i + 1}"), i + 1)
        for i in range(frames)
    ]


def is_localizer(ds: pydicom.Dataset) -> bool:
    """Whether an instance is a localiser (scout): CT Image Type value 3 is ``LOCALIZER``."""
    image_type = ds.get("ImageType")
    if image_type is None or isinstance(image_type, str | bytes):
        values = [str(image_type or "")]
    else:
        values = [str(v) for v in image_type]
    return len(values) >= 3 and values[2].strip().upper() == "LOCALIZER"


def order_series(instances: Sequence[InstanceRef]) -> OrderedSeries:
    """Read every header and sort the slices (or frames) along the normal of the first one.

    Localisers are left out when the series has other instances (see the module's docstring).
    """
    if not instances:
        raise InconsistentSeries("the series has no instances")
    headers = [(ref, read_header(ref)) for ref in instances]
    images = [(ref, ds) for ref, ds in headers if not is_localizer(ds)]
    if images and len(images) < len(headers):
        logger.info("series: %d localiser instance(s) left out of %d (%s)",
                    len(headers) - len(images), len(headers),
                    ", ".join(ref.sop_instance_uid for ref, ds in headers if is_localizer(ds)))
        headers = images
    kinds = {is_multiframe(ds) for _, ds in headers}
    if len(kinds) > 1:
        multi = sum(is_multiframe(ds) for _, ds in headers)
        raise InconsistentSeries(
            f"the series mixes {len(headers) - multi} single-frame (classic CT) and {multi} "
            "multi-frame (Enhanced CT) instances; a series must be one or the other"
        )
    keyed: list[tuple[float, int, int, SliceInfo]] = []
    first_orientation: tuple[float, ...] | None = None
    normal: NDArray[np.float64] | None = None
    for ref, ds in headers:
        try:
            rows, columns = int(ds.Rows), int(ds.Columns)
        except (AttributeError, ValueError, TypeError) as exc:
            raise InconsistentSeries(
                f"SOP Instance {ref.sop_instance_uid} lacks Rows or Columns"
            ) from exc
        number = ds.get("InstanceNumber")
        instance_number = int(number) if number not in (None, "") else 0
        for geometry, frame in _slices_of(ref, ds):
            where = ref.sop_instance_uid + (f" frame {frame}" if frame is not None else "")
            if normal is None or first_orientation is None:
                try:
                    normal = slice_normal(geometry.orientation)
                except ValueError as exc:
                    raise InconsistentSeries(
                        f"SOP Instance {where} has no usable ImageOrientationPatient"
                    ) from exc
                first_orientation = geometry.orientation
            elif max(abs(a - b) for a, b in zip(geometry.orientation, first_orientation,
                                                strict=True)) > ORIENTATION_TOLERANCE:
                raise InconsistentSeries(
                    f"slices of the series differ in orientation: {where} has "
                    f"ImageOrientationPatient {list(geometry.orientation)}, the first slice "
                    f"{list(first_orientation)}"
                )
            position = float(np.dot(normal, geometry.position))
            pitch = area = None
            if geometry.spacing is not None:
                pitch = (geometry.spacing[0] + geometry.spacing[1]) / 2
                area = geometry.spacing[0] * geometry.spacing[1]
            keyed.append((
                position, instance_number, frame or 0,
                SliceInfo(0, ref.sop_instance_uid, ref.path, position, rows, columns, pitch,
                          area, frame, geometry.rescale),
            ))
    keyed.sort(key=lambda item: (item[0], item[1], item[2]))
    ordered = tuple(replace(s, index=i) for i, (_, _, _, s) in enumerate(keyed))
    sizes = {(s.rows, s.columns) for s in ordered}
    if len(sizes) > 1:
        raise InconsistentSeries(f"slices of the series differ in size: {sorted(sizes)}")
    assert normal is not None
    n = normal.tolist()
    return OrderedSeries(slices=ordered, normal=(n[0], n[1], n[2]))


def _check_shape(info: SliceInfo, stored: NDArray[Any]) -> None:
    if stored.shape != (info.rows, info.columns):
        raise UndecodablePixelData(
            info.sop_instance_uid,
            f"decoded shape {stored.shape} of {info.label()} is not Rows x Columns "
            f"{(info.rows, info.columns)}",
        )


def _frame_hu(info: SliceInfo, stored: NDArray[Any]) -> NDArray[np.float32]:
    _check_shape(info, stored)
    slope, intercept = info.rescale or (1.0, 0.0)
    return rescale_to_hu(stored, {"RescaleSlope": slope, "RescaleIntercept": intercept})


def decode_hu(info: SliceInfo) -> NDArray[np.float32]:
    """One slice (or frame) in Hounsfield units, float32 (rows, columns)."""
    if info.frame_number is not None:
        [(_, hu)] = list(iter_frames([info]))
        return hu
    try:
        ds = pydicom.dcmread(info.path)
        stored = ds.pixel_array
    except Exception as exc:  # decoders raise many unrelated types; all mean "cannot decode"
        raise UndecodablePixelData(info.sop_instance_uid, f"{type(exc).__name__}: {exc}") from exc
    _check_shape(info, stored)
    return rescale_to_hu(stored, ds)


def iter_frames(infos: Sequence[SliceInfo]) -> Iterator[tuple[int, NDArray[np.float32]]]:
    """``(position in infos, HU)`` of frames of one multi-frame instance, in file order.

    Only the frames asked for are decoded (pydicom reads the header's image
    pixel attributes, then just those frames), one at a time: the caller
    stores each before the next is decoded.
    """
    path, sop = infos[0].path, infos[0].sop_instance_uid
    where: dict[int, list[int]] = {}
    for position, info in enumerate(infos):
        where.setdefault((info.frame_number or 1) - 1, []).append(position)
    wanted = sorted(where)
    frames = iter_pixels(path, indices=wanted)
    for index in wanted:
        try:
            stored = next(frames)
        except Exception as exc:  # decoders raise many unrelated types: all "cannot decode"
            raise UndecodablePixelData(
                sop, f"frame {index + 1}: {type(exc).__name__}: {exc}"
            ) from exc
        for position in where[index]:
            yield position, _frame_hu(infos[position], stored)


def _decode_group(group: Sequence[SliceInfo]) -> Iterator[tuple[int, NDArray[np.float32]]]:
    """``(position in group, HU)`` of a group: one classic slice, or frames of one file."""
    if group[0].frame_number is None:
        return ((i, decode_hu(info)) for i, info in enumerate(group))
    return iter_frames(group)


def _decode_group_list(group: Sequence[SliceInfo]) -> list[tuple[int, NDArray[np.float32]]]:
    return list(_decode_group(group))


def iter_batches(
    series: OrderedSeries, batch_size: int, decode_threads: int = 1
) -> Iterator[SliceBatch]:
    """Decode the ordered series ``batch_size`` slices at a time.

    A batch's frames of one multi-frame instance are decoded in one pass over
    that file. ``decode_threads`` > 1 decodes a batch's instances in a thread
    pool (the JPEG decoders release the GIL); memory still holds one batch.
    """
    rows, columns = series.shape
    pool = ThreadPoolExecutor(decode_threads) if decode_threads > 1 else None
    try:
        for start in range(0, len(series.slices), batch_size):
            chunk = series.slices[start : start + batch_size]
            out = np.empty((len(chunk), rows, columns), dtype=np.float32)
            groups: dict[tuple[Path, int], list[int]] = {}
            for i, info in enumerate(chunk):
                # classic slices: one group each; frames: one group per file
                key = (info.path, i if info.frame_number is None else -1)
                groups.setdefault(key, []).append(i)
            members = list(groups.values())
            work = [[chunk[i] for i in group] for group in members]
            # in one thread each decoded slice goes straight into ``out``
            decoded = pool.map(_decode_group_list, work) if pool else map(_decode_group, work)
            for group, images in zip(members, decoded, strict=True):
                for position, image in images:
                    out[group[position]] = image
            yield SliceBatch(slices=chunk, hu=out)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
