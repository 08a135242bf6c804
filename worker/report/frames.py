"""Slices that are frames: references to Enhanced CT frames in the report objects.

A slice of a classic CT series is a whole SOP Instance; a slice of an Enhanced
CT series is one frame of a multi-frame instance. The report objects reference
such a slice by its SOP Instance **and** its Referenced Frame Number
(1-based, PS3.3 C.17.3.2 / Table 10-3), and describe its geometry from the
frame's functional groups (Plane Position, Plane Orientation, Pixel Measures).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydicom import Dataset

from ctdx.worker.loading import functional_group

#: What a frame's description must not carry over from its multi-frame instance.
_DROPPED = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
            "PixelData", "NumberOfFrames")


def frame_view(image: Dataset, frame_number: int | None) -> Dataset:
    """``image`` as it describes one slice: itself when single-frame, else the frame's view.

    The view has the instance's top-level attributes (patient, study, series,
    UIDs, Rows, Columns) and, at the top level, the frame's
    ImagePositionPatient, ImageOrientationPatient, PixelSpacing and
    SliceThickness. It is an in-memory description for the report builders,
    never stored.
    """
    if frame_number is None:
        return image
    view = Dataset()
    for element in image:
        if element.keyword not in _DROPPED:
            view.add(element)
    index = frame_number - 1
    position = functional_group(image, index, "PlanePositionSequence")
    orientation = functional_group(image, index, "PlaneOrientationSequence")
    measures = functional_group(image, index, "PixelMeasuresSequence")
    if position is not None and "ImagePositionPatient" in position:
        view.ImagePositionPatient = position.ImagePositionPatient
    if orientation is not None and "ImageOrientationPatient" in orientation:
        view.ImageOrientationPatient = orientation.ImageOrientationPatient
    if measures is not None:
        for keyword in ("PixelSpacing", "SliceThickness"):
            if keyword in measures:
                setattr(view, keyword, measures[keyword].value)
    return view


def set_frame_numbers(items: Iterable[Dataset], frames: Sequence[Sequence[int]]) -> None:
    """Add Referenced Frame Number to IMAGE content items, in order; empty: whole instance."""
    images = [item for item in items if item.get("ValueType") == "IMAGE"]
    if len(images) != len(frames):
        raise ValueError(f"{len(images)} image references for {len(frames)} frame lists")
    for item, numbers in zip(images, frames, strict=True):
        if numbers:
            reference = item.ReferencedSOPSequence[0]
            reference.ReferencedFrameNumber = (
                list(numbers) if len(numbers) > 1 else numbers[0]
            )
