"""A corpus of CT series nobody here wrote, and the edits real-world series come with.

The sources are files from elsewhere: pydicom's ``CT_small.dcm`` (a signed
16-bit CT slice, ISO_IR 100), pynetdicom's ``CTImageStorage.dcm`` (another
vendor header), pydicom-data's ``eCT_Supplemental.dcm`` (an Enhanced CT
instance) and, when present, a scanner series from ``../shared/data``. A
single slice becomes a small series by copying it with new SOP Instance UIDs
and positions along the slice normal. Each case is a study of its own.

Transfer syntaxes are made by the usual tools: pydicom's encoders (RLE,
JPEG-LS, JPEG 2000 lossless, deflate, implicit VR) and dcmtk (``dcmconv +tb``
for big endian, which swaps the pixel bytes; ``dcmcjpeg +e1`` for JPEG
Lossless SV1).
"""

from __future__ import annotations

import copy
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.conftest import require_tool

SLICES = 6
Edit = Callable[[Dataset, int], None]


@dataclass(frozen=True)
class Case:
    """One study of the corpus: its files and the transfer syntaxes a sender proposes."""

    name: str
    files: tuple[Path, ...]
    study_instance_uid: str
    syntax: str
    # what a sender offers besides the file's own syntax (it converts when that is refused)
    fallback: tuple[str, ...] = ()
    notes: str = ""
    expect: str = "analysed"  # analysed | failed | refused (by the listener)
    reason: str = ""  # a word the stored or answered reason must contain
    extra: dict[str, str] = field(default_factory=dict)


def ct_small() -> Dataset:
    path = get_testdata_file("CT_small.dcm", download=False)
    assert path is not None, "pydicom's CT_small.dcm"
    return pydicom.dcmread(path)


def pynetdicom_ct() -> Dataset:
    import pynetdicom

    path = Path(pynetdicom.__file__).parent / "tests" / "dicom_files" / "CTImageStorage.dcm"
    return pydicom.dcmread(path)


def enhanced_ct() -> Path:
    path = get_testdata_file("eCT_Supplemental.dcm", download=False)
    assert path is not None, "pydicom-data's eCT_Supplemental.dcm"
    return Path(path)


def _normal(ds: Dataset) -> np.ndarray:
    orientation = [float(v) for v in ds.ImageOrientationPatient]
    return np.cross(orientation[:3], orientation[3:])


def make_series(
    base: Dataset,
    out_dir: Path,
    n: int = SLICES,
    edit: Edit | None = None,
    positions: list[float] | None = None,
) -> tuple[list[Path], str]:
    """``n`` copies of ``base`` as one new series of a new study (explicit VR little endian)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    thickness = float(base.get("SliceThickness") or 5.0) or 5.0
    offsets = positions if positions is not None else [i * thickness for i in range(n)]
    paths = []
    for i, offset in enumerate(offsets):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        origin = np.array([float(v) for v in base.ImagePositionPatient])
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + offset * _normal(base)]
        ds.SliceLocation = round(float(origin[2] + offset), 4)
        if edit is not None:
            edit(ds, i)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, study


def transcode(paths: list[Path], syntax: str) -> None:
    """Rewrite ``paths`` in place in ``syntax``."""
    for path in paths:
        if syntax == ExplicitVRBigEndian:
            _dcmtk("dcmconv", "+tb", path)
        elif syntax == JPEGLosslessSV1:
            _dcmtk("dcmcjpeg", "+e1", path)
        elif syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
            ds = pydicom.dcmread(path)
            ds.compress(syntax)
            ds.save_as(path, enforce_file_format=True)
        elif syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
            ds = pydicom.dcmread(path)
            ds.file_meta.TransferSyntaxUID = UID(syntax)
            ds.save_as(path, enforce_file_format=True)
        elif syntax != ExplicitVRLittleEndian:
            raise ValueError(f"no transcoder for {syntax}")


def _dcmtk(tool: str, option: str, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    subprocess.run([require_tool(tool), option, str(path), str(tmp)], check=True,
                   capture_output=True, timeout=120)
    tmp.replace(path)


# --- edits ---------------------------------------------------------------------------------


def for_missing(ds: Dataset, i: int) -> None:
    del ds.FrameOfReferenceUID


def for_empty(ds: Dataset, i: int) -> None:
    ds.FrameOfReferenceUID = ""


def series_fields_missing(ds: Dataset, i: int) -> None:
    for keyword in ("SeriesNumber", "SeriesDescription", "StudyDescription", "AccessionNumber"):
        if keyword in ds:
            delattr(ds, keyword)


def patient_name_empty(ds: Dataset, i: int) -> None:
    ds.PatientName = ""


def latin1(ds: Dataset, i: int) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    ds.StudyDescription = "Thorax nativ, Lungenfenster"


def utf8(ds: Dataset, i: int) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "王^小明"
    ds.StudyDescription = "胸部CT"


def rescale_slope_2(ds: Dataset, i: int) -> None:
    """Signed pixels stored at half the HU: Rescale Slope 2, HU unchanged."""
    stored = ds.pixel_array.astype(np.int32)
    hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    new = np.round((hu + 1024.0) / 2.0).astype(np.int16)
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    ds.PixelData = new.tobytes()


def gantry_tilt(ds: Dataset, i: int) -> None:
    """12 degrees: the column direction leaves the axial plane (the slices stay parallel)."""
    angle = math.radians(12.0)
    ds.GantryDetectorTilt = 12
    ds.ImageOrientationPatient = [1, 0, 0, 0, round(math.cos(angle), 6),
                                  round(-math.sin(angle), 6)]


def large_1024(ds: Dataset, i: int) -> None:
    pixels = ds.pixel_array
    factor = 1024 // pixels.shape[0]
    ds.PixelData = np.kron(pixels, np.ones((factor, factor), dtype=pixels.dtype)).tobytes()
    ds.Rows = ds.Columns = 1024
    ds.PixelSpacing = [round(float(v) / factor, 6) for v in ds.PixelSpacing]


def large_1024_for_empty(ds: Dataset, i: int) -> None:
    large_1024(ds, i)
    for_empty(ds, i)


def _localizer(ds: Dataset) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]


def localizer_first(ds: Dataset, i: int) -> None:
    """The first instance of the series is a coronal localiser (a scout of the same series)."""
    if i == 0:
        _localizer(ds)


def localizer_last(ds: Dataset, i: int) -> None:
    """The last instance of the series is a coronal localiser."""
    if i == SLICES:
        _localizer(ds)


def build_cases(root: Path, shared_data: Path | None) -> list[Case]:
    base, other = ct_small(), pynetdicom_ct()
    cases: list[Case] = []

    def add(name: str, source: Dataset, edit: Edit | None = None,
            syntax: str = ExplicitVRLittleEndian, n: int = SLICES,
            positions: list[float] | None = None, **kw: object) -> None:
        paths, study = make_series(source, root / name, n=n, edit=edit, positions=positions)
        transcode(paths, syntax)
        cases.append(Case(name, tuple(paths), study, syntax, **kw))  # type: ignore[arg-type]

    add("ct-small", base, notes="pydicom CT_small: signed 16-bit, ISO_IR 100")
    add("ct-small-implicit", base, syntax=ImplicitVRLittleEndian)
    add("ct-small-deflated", base, syntax=DeflatedExplicitVRLittleEndian)
    add("ct-small-big-endian", base, syntax=ExplicitVRBigEndian,
        fallback=(ExplicitVRLittleEndian,), notes="refused as is; the sender converts")
    add("ct-small-rle", base, syntax=RLELossless)
    add("ct-small-jpeg-ls", base, syntax=JPEGLSLossless)
    add("ct-small-jpeg-2000", base, syntax=JPEG2000Lossless)
    add("ct-small-jpeg-lossless", base, syntax=JPEGLosslessSV1)
    add("pynetdicom-ct", other, notes="pynetdicom's CTImageStorage.dcm")
    add("frame-of-reference-missing", base, for_missing)
    add("frame-of-reference-empty", base, for_empty)
    add("series-fields-missing", base, series_fields_missing)
    add("patient-name-empty", base, patient_name_empty)
    add("latin1-iso-ir-100", base, latin1)
    add("utf8-iso-ir-192", base, utf8)
    add("signed-rescale-slope-2", base, rescale_slope_2)
    add("gantry-tilt", base, gantry_tilt)
    add("uneven-spacing", base, positions=[0.0, 5.0, 7.5, 15.0, 16.0, 30.0])
    # a localiser in the axial series (common in real exports): left out, the rest analysed
    add("localizer-first-in-series", base, localizer_first, n=SLICES + 1)
    add("localizer-last-in-series", base, localizer_last, n=SLICES + 1)
    add("one-slice", base, n=1, expect="failed", reason="slice")
    add("large-1024", base, large_1024, n=4)
    add("large-1024-for-empty-jpeg-2000", base, large_1024_for_empty, syntax=JPEG2000Lossless,
        n=4)
    enhanced = root / "enhanced-ct" / "eCT_Supplemental.dcm"
    enhanced.parent.mkdir(parents=True)
    enhanced.write_bytes(enhanced_ct().read_bytes())
    header = pydicom.dcmread(enhanced, stop_before_pixels=True)
    cases.append(Case("pydicom-data-enhanced-ct", (enhanced,), str(header.StudyInstanceUID),
                      str(header.file_meta.TransferSyntaxUID), expect="failed", reason="slice",
                      notes="2 frames: fewer than the rules' minimum"))
    if shared_data is not None:
        cases += shared_cases(root, shared_data)
    return cases


def shared_cases(root: Path, shared_data: Path) -> list[Case]:
    """A real scanner series (JPEG Lossless) as it is and with an empty Frame of Reference UID."""
    folder = shared_data / "covid-ct-md" / "COVID-19" / "P001"
    files = sorted(folder.iterdir(), key=lambda p: int(pydicom.dcmread(
        p, stop_before_pixels=True).InstanceNumber))
    chosen = files[len(files) // 2 - 4: len(files) // 2 + 4]  # 8 slices through the lungs
    cases = []
    for name, edit in (("shared-p001", None), ("shared-p001-for-empty", for_empty)):
        out = root / name
        out.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        paths = []
        for i, source in enumerate(chosen):
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            if edit is not None:
                edit(ds, i)
            path = out / f"{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        syntax = str(pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
        cases.append(Case(name, tuple(paths), study, syntax, notes="../shared/data P001, 8 slices"))
    return cases
