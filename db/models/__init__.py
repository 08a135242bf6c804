"""All ORM models; importing this registers every table on ``Base.metadata``."""

from ctdx.db.models.audit import AuditEntry
from ctdx.db.models.base import Base, utcnow
from ctdx.db.models.exports import Export, ExportState
from ctdx.db.models.housekeeping import (
    Alert,
    AlertState,
    PruneState,
    ReportPrune,
    SelftestStudy,
    SpoolPrune,
)
from ctdx.db.models.listener import (
    Instance,
    OutboxEntry,
    PerformedProcedureStep,
    ReceivingLease,
    Series,
    Study,
    StudyVersion,
    VersionState,
)
from ctdx.db.models.operating_points import OperatingPoint
from ctdx.db.models.operations import ServiceHeartbeat, ServiceKind
from ctdx.db.models.results import STUDY_DECISIONS, Analysis, AnalysisState, SliceResult

__all__ = [
    "STUDY_DECISIONS",
    "Alert",
    "AlertState",
    "Analysis",
    "AnalysisState",
    "AuditEntry",
    "Base",
    "Export",
    "ExportState",
    "Instance",
    "OperatingPoint",
    "OutboxEntry",
    "PerformedProcedureStep",
    "PruneState",
    "ReceivingLease",
    "ReportPrune",
    "SelftestStudy",
    "ServiceHeartbeat",
    "ServiceKind",
    "Series",
    "SliceResult",
    "SpoolPrune",
    "Study",
    "StudyVersion",
    "VersionState",
    "utcnow",
]
