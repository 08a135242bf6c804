"""Synthetic chest CT phantoms with realistic Hounsfield units, and DICOM series of them.

Used by tests, benchmarks, the demo and the demonstration model: no patient data.
A phantom slice has air outside the body (-1000 HU), a body of fat (-100) and
soft tissue (40), a spine and ribs (700), two lungs (about -860) with vessels,
and, depending on ``kind``:

- ``covid19``: peripheral, bilateral ground-glass patches (-650..-350 HU),
  some with consolidation (0..40 HU) in their centre;
- ``other_pneumonia``: a dense, lobar consolidation (20..50 HU) in one lung;
- ``normal``: nothing.

Lesions only appear in the middle two thirds of the lung so slice labels are
meaningful (``PhantomSlice.lesion``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import pydicom

PhantomKind = Literal["covid19", "other_pneumonia", "normal"]
PHANTOM_KINDS: tuple[PhantomKind, ...] = ("covid19", "other_pneumonia", "normal")


@dataclass(frozen=True)
class PhantomSlice:
    hu: NDArray[np.int16]  # (rows, columns)
    z_mm: float
    lesion: bool  # True where this slice shows the kind's abnormality


def _ellipse(yy: NDArray[np.float32], xx: NDArray[np.float32], cy: float, cx: float,
             ry: float, rx: float) -> NDArray[np.bool_]:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def phantom_slice(
    kind: PhantomKind,
    t: float,
    size: int = 512,
    rng: np.random.Generator | None = None,
    lesion_seed: int = 0,
) -> tuple[NDArray[np.int16], bool]:
    """One axial slice; ``t`` in [0, 1] runs from lung apex (0) to base (1).

    Returns the HU image and whether it shows a lesion.
    """
    rng = rng or np.random.default_rng(0)
    s = size / 512.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.full((size, size), -1000.0, dtype=np.float32)
    cy, cx = size * 0.52, size * 0.5
    body = _ellipse(yy, xx, cy, cx, 150 * s, 215 * s)
    img[body] = -100.0  # subcutaneous fat
    img[_ellipse(yy, xx, cy, cx, 138 * s, 200 * s)] = 40.0  # muscle / soft tissue
    # ribs: a ring of small bright blobs
    for ang in np.linspace(0, 2 * np.pi, 18, endpoint=False):
        ry, rx = cy + 128 * s * np.sin(ang), cx + 188 * s * np.cos(ang)
        img[_ellipse(yy, xx, ry, rx, 7 * s, 9 * s)] = 700.0
    img[_ellipse(yy, xx, cy + 105 * s, cx, 22 * s, 20 * s)] = 700.0  # vertebral body
    # lungs grow from apex to mid and shrink to the base
    extent = float(np.clip(np.sin(np.pi * np.clip(t, 0.02, 0.98)) ** 0.6, 0.15, 1.0))
    lung_ry, lung_rx = 105 * s * extent, 70 * s * extent
    lesion = False
    lrng = np.random.default_rng(lesion_seed)
    for side in (-1, 1):
        lcx = cx + side * 95 * s
        lung = _ellipse(yy, xx, cy - 5 * s, lcx, lung_ry, lung_rx)
        img[lung] = -860.0
        # vessels
        for _ in range(6):
            vy = cy - 5 * s + lrng.uniform(-0.6, 0.6) * lung_ry
            vx = lcx + lrng.uniform(-0.6, 0.6) * lung_rx
            img[_ellipse(yy, xx, vy, vx, 3 * s, 3 * s) & lung] = 30.0
        in_band = 0.2 < t < 0.85
        if kind == "covid19" and in_band:
            for _ in range(3):
                ang = lrng.uniform(0, 2 * np.pi)
                py = cy - 5 * s + 0.7 * lung_ry * np.sin(ang)
                px = lcx + 0.7 * lung_rx * np.cos(ang)
                r = lrng.uniform(14, 24) * s * extent
                patch = _ellipse(yy, xx, py, px, r, r * 1.3) & lung
                img[patch] = lrng.uniform(-650, -350)
                img[_ellipse(yy, xx, py, px, r * 0.35, r * 0.45) & lung] = lrng.uniform(0, 40)
            lesion = True
        if kind == "other_pneumonia" and in_band and side == 1:
            cons = lung & (yy > cy - 5 * s + 0.1 * lung_ry)
            img[cons] = 35.0
            lesion = True
    img += rng.normal(0.0, 12.0, size=img.shape).astype(np.float32)
    return np.clip(img, -1024, 3071).astype(np.int16), lesion


def phantom_volume(
    kind: PhantomKind, n_slices: int = 60, size: int = 512, seed: int = 0
) -> list[PhantomSlice]:
    """A whole chest: ``n_slices`` axial slices, head first, 2 mm apart."""
    rng = np.random.default_rng(seed)
    slices = []
    for i in range(n_slices):
        t = i / max(n_slices - 1, 1)
        hu, lesion = phantom_slice(kind, t, size=size, rng=rng, lesion_seed=seed * 1000 + i)
        slices.append(PhantomSlice(hu=hu, z_mm=-2.0 * i, lesion=lesion))
    return slices


@dataclass(frozen=True)
class PhantomStudy:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    paths: tuple[Path, ...]
    kind: PhantomKind


def phantom_datasets(
    kind: PhantomKind,
    n_slices: int = 60,
    size: int = 512,
    seed: int = 0,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    patient_id: str = "PHANTOM-0001",
) -> Iterator[pydicom.Dataset]:
    """Yield CT Image Storage datasets (explicit VR little endian, uncompressed)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    now = datetime.now()
    spacing = 350.0 / size
    for index, sl in enumerate(phantom_volume(kind, n_slices=n_slices, size=size, seed=seed)):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName = "PHANTOM^SYNTHETIC"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.SeriesDate = ds.StudyDate
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.AccessionNumber = f"SYN{seed:05d}"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.StudyDescription = f"Synthetic chest phantom ({kind})"
        ds.SeriesDescription = "Synthetic phantom, lung kernel"
        ds.SeriesNumber = 2
        ds.InstanceNumber = index + 1
        ds.Manufacturer = "ctdx synthetic phantom"
        ds.BodyPartExamined = "CHEST"
        ds.ConvolutionKernel = "LUNG"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = 2.0
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [-175.0, -175.0, sl.z_mm]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = sl.z_mm
        ds.PixelSpacing = [spacing, spacing]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        stored = (sl.hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        yield ds


def write_phantom_series(
    out_dir: Path,
    kind: PhantomKind = "covid19",
    n_slices: int = 60,
    size: int = 512,
    seed: int = 0,
    transfer_syntax_uid: str | None = None,
    **uids: str,
) -> PhantomStudy:
    """Write a phantom series as DICOM files ``out_dir/<SOPInstanceUID>.dcm``.

    ``transfer_syntax_uid`` re-encodes with pydicom's encoders (RLE, JPEG-LS,
    JPEG 2000 lossless; plugins from pylibjpeg / pyjpegls / gdcm).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    sops: list[str] = []
    study_uid = series_uid = ""
    for ds in phantom_datasets(kind, n_slices=n_slices, size=size, seed=seed, **uids):
        if transfer_syntax_uid is not None:
            ds.compress(transfer_syntax_uid)
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sops.append(str(ds.SOPInstanceUID))
        study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    return PhantomStudy(study_uid, series_uid, tuple(sops), tuple(paths), kind)


def phantom_labels(kind: PhantomKind, n_slices: int) -> Sequence[bool]:
    """Lesion flag per slice, head first, without rendering images."""
    return [0.2 < i / max(n_slices - 1, 1) < 0.85 and kind != "normal" for i in range(n_slices)]


ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"  # pydicom.uid.EnhancedCTImageStorage


def _item(**values: object) -> pydicom.Dataset:
    import pydicom

    ds = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def enhanced_phantom_dataset(
    kind: PhantomKind,
    n_slices: int = 60,
    size: int = 512,
    seed: int = 0,
    frame_order: Sequence[int] | None = None,
    per_frame_rescale: bool = False,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    patient_id: str = "PHANTOM-0001",
) -> pydicom.Dataset:
    """The phantom of :func:`phantom_datasets` as one Enhanced CT Image Storage instance.

    Same HU, positions, spacing and patient as the classic series of the same
    arguments. ``frame_order[k]`` is the phantom slice (head first) stored as frame
    ``k + 1``: a shuffled order checks that readers sort frames by position.
    ``per_frame_rescale`` puts Pixel Value Transformation in the per-frame groups
    with an intercept that alternates between -1024 and -2048 (the stored values
    compensate); otherwise it is shared.

    Modules and functional groups are those of the Enhanced CT IOD (PS3.3 A.38)
    for an ORIGINAL image, so that dicom3tools' ``dciodvfy`` finds no error.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    volume = phantom_volume(kind, n_slices=n_slices, size=size, seed=seed)
    order = list(frame_order) if frame_order is not None else list(range(n_slices))
    if sorted(order) != list(range(n_slices)):
        raise ValueError("frame_order must be a permutation of range(n_slices)")
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    sop_uid = generate_uid()
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    spacing = 350.0 / size

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ENHANCED_CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    # SOP Common, Patient, General Study
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.PatientName = "PHANTOM^SYNTHETIC"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = date
    ds.StudyTime = time
    ds.AccessionNumber = f"SYN{seed:05d}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = f"Synthetic chest phantom ({kind})"
    # General Series, CT Series, Frame of Reference
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = "Synthetic phantom, lung kernel, enhanced"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    # General and Enhanced General Equipment
    ds.Manufacturer = "ctdx synthetic phantom"
    ds.ManufacturerModelName = "phantom"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "ctdx"
    # Image Pixel and Enhanced CT Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = date + time
    ds.AcquisitionDuration = 1.0
    ds.ContentQualification = "RESEARCH"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.AcquisitionContextSequence = []
    # Multi-frame Functional Groups and Multi-frame Dimension
    ds.InstanceNumber = 1
    ds.ContentDate = date
    ds.ContentTime = time
    ds.NumberOfFrames = n_slices
    dimension_uid = generate_uid()
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dimension_uid)]
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = [
        _item(DimensionOrganizationUID=dimension_uid, DimensionIndexPointer=0x00209056,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="Stack ID"),
        _item(DimensionOrganizationUID=dimension_uid, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111,
              DimensionDescriptionLabel="In-Stack Position Number"),
    ]
    chest = _item(CodeValue="51185008", CodingSchemeDesignator="SCT", CodeMeaning="Chest")
    shared = _item(
        PixelMeasuresSequence=[_item(PixelSpacing=[spacing, spacing], SliceThickness=2.0)],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])],
        FrameAnatomySequence=[_item(AnatomicRegionSequence=[chest], FrameLaterality="U")],
        FrameVOILUTSequence=[_item(WindowCenter=-600, WindowWidth=1500)],
        IrradiationEventIdentificationSequence=[_item(IrradiationEventUID=generate_uid())],
        CTImageFrameTypeSequence=[_item(
            FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
        )],
        CTAcquisitionTypeSequence=[_item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO",
                                         FluoroscopyFlag="NO")],
        CTAcquisitionDetailsSequence=[_item(
            DataCollectionDiameter=500.0, RevolutionTime=0.5, SingleCollimationWidth=0.625,
            TotalCollimationWidth=40.0, TableHeight=150.0, GantryDetectorTilt=0.0,
        )],
        CTTableDynamicsSequence=[_item(TableSpeed=80.0, TableFeedPerRotation=40.0,
                                       SpiralPitchFactor=1.0)],
        CTGeometrySequence=[_item(DistanceSourceToDetector=1085.6,
                                  DistanceSourceToDataCollectionCenter=595.0)],
        CTReconstructionSequence=[_item(
            ReconstructionAlgorithm="FILTER_BACK_PROJ", ConvolutionKernel="LUNG",
            ConvolutionKernelGroup="LUNG", ImageFilter="NONE", ReconstructionDiameter=350.0,
            ReconstructionPixelSpacing=[spacing, spacing], ReconstructionAngle=90.0,
        )],
        CTExposureSequence=[_item(
            ExposureTimeInms=500.0, XRayTubeCurrentInmA=200.0, ExposureInmAs=100.0,
            ExposureModulationType="NONE", CTDIvol=8.0,
            CTDIPhantomTypeCodeSequence=[_item(CodeValue="113691", CodingSchemeDesignator="DCM",
                                               CodeMeaning="IEC Body Dosimetry Phantom")],
        )],
        CTXRayDetailsSequence=[_item(KVP=120, FocalSpots=[1.2], FilterType="BODY",
                                     FilterMaterial=["ALUMINUM"])],
    )
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = [
            _item(RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU")
        ]
    ds.SharedFunctionalGroupsSequence = [shared]
    # positions: phantom slice i lies at z = -2 i; In-Stack Position 1 is the lowest z
    frames = []
    pixels = np.empty((n_slices, size, size), dtype=np.uint16)
    for k, slice_index in enumerate(order):
        sl = volume[slice_index]
        intercept = -2048 if per_frame_rescale and k % 2 else -1024
        pixels[k] = (sl.hu.astype(np.int32) - intercept).astype(np.uint16)
        frame = _item(
            FrameContentSequence=[_item(
                FrameAcquisitionNumber=1,
                FrameReferenceDateTime=date + time,
                FrameAcquisitionDateTime=date + time,
                FrameAcquisitionDuration=500.0,
                StackID="1",
                InStackPositionNumber=n_slices - slice_index,
                DimensionIndexValues=[1, n_slices - slice_index],
            )],
            PlanePositionSequence=[_item(ImagePositionPatient=[-175.0, -175.0, sl.z_mm])],
            CTPositionSequence=[_item(
                TablePosition=sl.z_mm,
                ReconstructionTargetCenterPatient=[0.0, 0.0, sl.z_mm],
                DataCollectionCenterPatient=[0.0, 0.0, sl.z_mm],
            )],
        )
        if per_frame_rescale:
            frame.PixelValueTransformationSequence = [
                _item(RescaleIntercept=intercept, RescaleSlope=1, RescaleType="HU")
            ]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = pixels.tobytes()
    return ds


def write_enhanced_phantom(
    out_dir: Path,
    kind: PhantomKind = "covid19",
    n_slices: int = 60,
    size: int = 512,
    seed: int = 0,
    frame_order: Sequence[int] | None = None,
    per_frame_rescale: bool = False,
    transfer_syntax_uid: str | None = None,
    **uids: str,
) -> PhantomStudy:
    """Write :func:`enhanced_phantom_dataset` as ``out_dir/<SOPInstanceUID>.dcm``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = enhanced_phantom_dataset(kind, n_slices=n_slices, size=size, seed=seed,
                                  frame_order=frame_order, per_frame_rescale=per_frame_rescale,
                                  **uids)
    if transfer_syntax_uid is not None:
        ds.compress(transfer_syntax_uid)
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return PhantomStudy(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                        (str(ds.SOPInstanceUID),), (path,), kind)
