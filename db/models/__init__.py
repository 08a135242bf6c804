"""All ORM models; importing this registers every table on ``Base.metadata``."""

from db.models.audit import AuditEntry
from db.models.base import Base, utcnow
from db.models.exports import Export, ExportState
from db.models.housekeeping import (
    Alert,
    AlertState,
    PruneState,
    ReportPrune,
    SelftestStudy,
    SpoolPrune,
)
from db.models.listener import (
    Instance,
    OutboxEntry,
    PerformedProcedureStep,
    ReceivingLease,
    Series,
    Study,
    StudyVersion,
    VersionState,
)
from db.models.operating_points import OperatingPoint
from db.models.operations import ServiceHeartbeat, ServiceKind
from db.models.results import Analysis, AnalysisState, SliceResult

__all__ = [
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
