"""Every coded concept ctdx writes into a report, in one place.

Sources, checked when the codes were chosen:

- ``DCM`` and the UCUM/SCT codes marked "PS3.16" are in DICOM PS3.16 (Content
  Mapping Resource); pydicom ships a dictionary generated from it
  (``pydicom.sr.codedict.codes``), so those are taken from there rather than
  typed in.
- SNOMED CT codes not in PS3.16 cite the public page that lists them with the
  same concept id and preferred term.
- Where no standard concept fits (e.g. "share of analysed slices called
  COVID-19", a quantity defined by the method of Chen et al. 2021), ctdx uses
  its own private coding scheme :data:`PRIVATE_SCHEME` (``99CTDX``; PS3.16
  section 8.2: designators beginning with "99" are private). Every SR that
  uses it identifies the scheme in its Coding Scheme Identification Sequence
  (:data:`PRIVATE_SCHEME_IDENTIFICATION`). docs/sr-content.md lists all codes.
"""

from __future__ import annotations

import logging
from typing import Final

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

logger = logging.getLogger(__name__)

PRIVATE_SCHEME: Final = "99CTDX"
PRIVATE_SCHEME_IDENTIFICATION: Final = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="ctdx private codes",
    version="1",
    responsible_organization="ctdx project (see docs/sr-content.md)",
)


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


# --- the study call: value of "Finding" (DCM 121071) and of "Impression" -------------------
#: SNOMED CT 840539006 "Disease caused by severe acute respiratory syndrome coronavirus 2
#: (disorder)"; listed with this id in HL7's SANER value set COVID19DXSNOMED
#: (http://hl7.org/fhir/uv/saner/ValueSet-COVID19DXSNOMED.html). That term is 66 characters
#: and Code Meaning (LO) allows 64, so the meaning is its synonym "COVID-19", the display the
#: EU Digital COVID Certificate value set "disease-agent-targeted" gives this id (SNOMED CT
#: international 20210131).
COVID19: Final = CodedConcept("840539006", "SCT", "COVID-19")
#: SNOMED CT 233604007 "Pneumonia (disorder)" (e.g. C-CDA on FHIR example
#: Condition-CF-problem; SNOMED CT release: parent 205237003 Pneumonitis). ctdx's
#: "other pneumonia" call: pneumonia, with COVID-19 not called (the COVID-19 share is
#: at or below the threshold).
PNEUMONIA: Final = CodedConcept("233604007", "SCT", "Pneumonia")
#: SNOMED CT 17621005 "Normal" (PS3.16, e.g. CID 222 "Normal/Abnormal").
NORMAL: Final = CodedConcept.from_code(codes.SCT.Normal)

#: Study call (``analyses.decision``) -> code.
DECISION_CODES: Final[dict[str, CodedConcept]] = {
    "covid19": COVID19,
    "other_pneumonia": PNEUMONIA,
    "normal": NORMAL,
}

# --- manifestations among COVID-19 slices (paper: GGO, consolidation, fibrotic streaks) ----
#: DCM 112120 "Ground glass opacity" (PS3.16 CID 6104 "Abnormal Opacity Finding or Feature";
#: definition from Fraser and Pare). Preferred over RadLex because it is in DICOM itself.
GROUND_GLASS_OPACITY: Final = CodedConcept.from_code(codes.DCM.GroundGlassOpacity)
#: SNOMED CT 95436008 "Lung consolidation (disorder)" (SNOMED CT release: an inferred parent
#: of 233604007 Pneumonia).
CONSOLIDATION: Final = CodedConcept("95436008", "SCT", "Lung consolidation")
#: SNOMED CT 112674009 "Fibrosis" (PS3.16, CID 6335/6336). The paper's "fibrotic streaks" has
#: no exact standard concept; fibrosis is the closest verified one (docs/sr-content.md says so).
FIBROSIS: Final = CodedConcept.from_code(codes.SCT.Fibrosis)

#: ``slice_results.manifestation`` -> code.
MANIFESTATION_CODES: Final[dict[str, CodedConcept]] = {
    "ground_glass_opacity": GROUND_GLASS_OPACITY,
    "consolidation": CONSOLIDATION,
    "fibrotic_streaks": FIBROSIS,
}

# --- context ----------------------------------------------------------------------------
#: SNOMED CT 39607008 "Lung" (PS3.16 CID 4 and others): finding site of every group.
LUNG: Final = CodedConcept.from_code(codes.SCT.Lung)
#: SNOMED CT 77477000 "Computed tomography" (PS3.16 CID 10005): Procedure Reported (TID 1500
#: row 4; CID 100 is extensible).
COMPUTED_TOMOGRAPHY: Final = CodedConcept.from_code(codes.SCT.ComputedTomography)
#: DCM 126000 "Imaging Measurement Report" (PS3.16 CID 7021): document title of TID 1500.
IMAGING_MEASUREMENT_REPORT: Final = CodedConcept.from_code(codes.DCM.ImagingMeasurementReport)
#: DCM 121073 "Impression" (PS3.16 CID 7002): concept name of the study call's
#: qualitative evaluation.
IMPRESSION: Final = CodedConcept.from_code(codes.DCM.Impression)
#: DCM 122411 "Threshold Value" (PS3.16): the share of COVID-19 slices above which the study
#: is called COVID-19 (paper: 5%).
THRESHOLD_VALUE: Final = CodedConcept.from_code(codes.DCM.ThresholdValue)
#: DCM 113000 "Of Interest" (PS3.16 CID 7010 "Key Object Selection Document Title").
KEY_OBJECT_TITLE: Final = CodedConcept.from_code(codes.DCM.OfInterest)

# --- units (UCUM) -------------------------------------------------------------------------
#: UCUM "%" (PS3.16 CID 7181).
PERCENT: Final = CodedConcept.from_code(codes.UCUM.Percent)
#: UCUM "1" "no units" (PS3.16 CID 7181): probabilities.
NO_UNITS: Final = CodedConcept.from_code(codes.UCUM.NoUnits)
#: UCUM annotation "{slices}": a count of CT slices (annotations in braces are unit 1 in UCUM).
SLICES: Final = CodedConcept("{slices}", "UCUM", "slices")

# --- private concepts (99CTDX) ------------------------------------------------------------
SHARE_COVID19: Final = _private("CTDX001", "Share of analysed slices classified COVID-19")
SHARE_OTHER_PNEUMONIA: Final = _private(
    "CTDX002", "Share of analysed slices classified other pneumonia"
)
SHARE_NORMAL: Final = _private("CTDX003", "Share of analysed slices classified normal")
SLICES_TOTAL: Final = _private("CTDX004", "Number of slices in the analysed series")
SLICES_ANALYSED: Final = _private("CTDX005", "Number of slices analysed")
SLICES_SKIPPED: Final = _private("CTDX006", "Number of slices skipped (too little lung)")
SLICES_WITH_MANIFESTATION: Final = _private(
    "CTDX007", "Number of COVID-19 slices classified with this manifestation"
)
SHARE_WITH_MANIFESTATION: Final = _private(
    "CTDX008", "Share of COVID-19 slices classified with this manifestation"
)
SLICE_PROBABILITY_COVID19: Final = _private("CTDX009", "Slice probability of COVID-19")
SLICE_MANIFESTATION: Final = _private("CTDX010", "Manifestation of the slice (classifier)")

#: Share concept per recognition class (``analyses.fraction_<class>``).
SHARE_CODES: Final[dict[str, CodedConcept]] = {
    "covid19": SHARE_COVID19,
    "other_pneumonia": SHARE_OTHER_PNEUMONIA,
    "normal": SHARE_NORMAL,
}


def all_codes() -> dict[str, CodedConcept]:
    """Every module-level code by name (docs and tests walk this)."""
    return {name: value for name, value in globals().items() if isinstance(value, CodedConcept)}
