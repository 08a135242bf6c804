"""A Secondary Capture summary image, for PACS viewers that do not display SR.

The key slice (lung window), the lung contour where the segmentation is
available, and the result as burned-in text on a band above the image. No
patient data is burned in: the PACS shows the patient from the header, and a
picture cannot be de-identified later. A key slice of an Enhanced CT series is
one frame: that frame is decoded, with its own rescale and pixel spacing from
the functional groups.
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.pixels.processing import apply_rescale
from pydicom.pixels.utils import pixel_array
from pydicom.uid import ExplicitVRLittleEndian

from ctdx.model_train.method.classes import DISPLAY_NAMES
from ctdx.model_train.method.hu import rescale_to_hu
from ctdx.worker.loading import functional_group
from ctdx.worker.report.inputs import ReportInput, SliceInfo
from ctdx.worker.report.sr import MANUFACTURER, local_datetime, series_description, software_version
from ctdx.worker.report.uids import SERIES_NUMBERS, object_uids

logger = logging.getLogger(__name__)

#: Width of the summary image; small source images are scaled up so the text stays legible.
WIDTH = 512
LINE_HEIGHT = 20  # pixels per line of the text band above the image
LUNG_WINDOW = (-600.0, 1500.0)  # centre, width (HU)


def hounsfield(
    image: Dataset, frame_number: int | None = None, pixels: Path | None = None
) -> NDArray[np.float32]:
    """HU of a single-frame image, or of frame ``frame_number`` (1-based) of a multi-frame one.

    ``pixels``: the file to decode the frame from when ``image`` is a header
    without pixel data (only that frame is read, not the whole instance).
    """
    if frame_number is None:
        return np.asarray(apply_rescale(image.pixel_array, image), dtype=np.float32)
    stored = pixel_array(pixels if pixels is not None else image, index=frame_number - 1)
    transform = functional_group(image, frame_number - 1, "PixelValueTransformationSequence")
    return rescale_to_hu(stored, transform if transform is not None else image)


def pixel_spacing_mm(image: Dataset, frame_number: int | None = None) -> float | None:
    spacing = image.get("PixelSpacing")
    if frame_number is not None:
        measures = functional_group(image, frame_number - 1, "PixelMeasuresSequence")
        if measures is not None and "PixelSpacing" in measures:
            spacing = measures.PixelSpacing
    return float(spacing[0]) if spacing else None


def lung_window(hu: NDArray[np.float32]) -> NDArray[np.uint8]:
    centre, width = LUNG_WINDOW
    scaled = (hu - (centre - width / 2.0)) / width
    windowed: NDArray[np.uint8] = (np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    return windowed


def lung_contour(hu: NDArray[np.float32], spacing_mm: float | None) -> NDArray[np.bool_] | None:
    """Boundary pixels of the method's lung mask, or ``None`` without the segmentation module.

    The import is deferred and may fail: the summary is optional output and
    is drawn without a contour rather than not at all.
    """
    try:
        from ctdx.model_train.method.segmentation import segment_lungs  # the paper's segmentation
    except ImportError:
        logger.info("lung segmentation not available: summary without lung contour")
        return None
    from skimage.segmentation import find_boundaries

    mask = np.asarray(segment_lungs(hu, spacing_mm=spacing_mm), dtype=bool)
    boundary: NDArray[np.bool_] = find_boundaries(mask, mode="inner")  # type: ignore[no-untyped-call]
    return boundary


def _frame(shown: SliceInfo) -> str:
    return f" (frame {shown.frame_number})" if shown.frame_number is not None else ""


def result_lines(inp: ReportInput, shown: SliceInfo) -> list[str]:
    call = DISPLAY_NAMES[inp.decision]
    lines = [
        "AI SECOND READER (ctdx) - UNVERIFIED - NOT A DIAGNOSIS",
        f"Study call: {call}",
        f"COVID-19 slices: {100 * inp.fractions['covid19']:.1f}% of {inp.slices_analysed} "
        f"analysed (threshold {100 * inp.threshold:g}%), {inp.slices_skipped} skipped",
    ]
    if shown.predicted_class == "covid19":
        detail = (
            f"Key slice {shown.slice_index + 1} of {inp.slices_total}{_frame(shown)}: "
            f"p(COVID-19) = {shown.p_covid19 or 0.0:.2f}"
        )
        if shown.manifestation in DISPLAY_NAMES:
            detail += f", {DISPLAY_NAMES[shown.manifestation]}"
        lines.append(detail)
    else:
        lines.append(
            f"Slice {shown.slice_index + 1} of {inp.slices_total}{_frame(shown)} "
            "(no COVID-19 slice)"
        )
    lines.append(f"Model: {inp.model_name} {inp.model_version}")
    if inp.is_demo_model:
        lines.append("SYNTHETIC DEMO MODEL - NO CLINICAL MEANING")
    return lines


def render(
    hu: NDArray[np.float32], lines: list[str], spacing_mm: float | None = None
) -> NDArray[np.uint8]:
    """RGB pixels: text band on top, the windowed slice (contour in green) below."""
    grey = lung_window(hu)
    rgb = np.stack([grey, grey, grey], axis=-1)
    contour = lung_contour(hu, spacing_mm)
    if contour is not None:
        rgb[contour] = (0, 220, 0)
    height = round(WIDTH * rgb.shape[0] / rgb.shape[1])
    picture = Image.fromarray(rgb).resize((WIDTH, height), Image.Resampling.BILINEAR)
    band = 12 + LINE_HEIGHT * len(lines)
    canvas = Image.new("RGB", (WIDTH, height + band), (0, 0, 0))
    canvas.paste(picture, (0, band))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    for row, line in enumerate(lines):
        colour = (255, 80, 80) if row == 0 else (255, 230, 0)
        draw.text((8, 6 + LINE_HEIGHT * row), line, fill=colour, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def build_summary(
    inp: ReportInput, image: Dataset, shown: SliceInfo, pixels: Path | None = None
) -> hd.sc.SCImage:
    """The summary of an analysis around ``image`` (the key slice, with pixel data).

    For a frame of a multi-frame instance ``image`` may be its header only and
    ``pixels`` the file the frame is decoded from.
    """
    uids = object_uids(inp.study_instance_uid, inp.study_version, inp.model_uid, "sc")
    spacing_mm = pixel_spacing_mm(image, shown.frame_number)
    hu = hounsfield(image, shown.frame_number, pixels)
    rendered = render(hu, result_lines(inp, shown), spacing_mm)
    moment = local_datetime(inp.finished_at)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=image,
        pixel_array=rendered,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.series_instance_uid,
        series_number=SERIES_NUMBERS["sc"],
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=inp.study_version,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "P"),
        series_description=series_description(inp),
        software_versions=software_version(),
        content_date=moment.date(),
        content_time=moment.time().replace(microsecond=0),
        series_date=moment.date(),
        series_time=moment.time().replace(microsecond=0),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # The image shows the chest (ctdx reads chest CT only); an unpaired body part also tells
    # validators that General Series Laterality (Type 2C) is rightly absent.
    sc.BodyPartExamined = "CHEST"
    sc.ConversionType = "WSD"  # workstation: rendered by software, not digitised
    sc.DateOfSecondaryCapture = sc.ContentDate
    sc.TimeOfSecondaryCapture = sc.ContentTime
    sc.BurnedInAnnotation = "YES"
    logger.info("built summary image %s for analysis %d", uids.sop_instance_uid, inp.analysis_id)
    return sc
