"""The phase audit: did each phase take effect? :class:`PhaseAudit` (:mod:`.phase_audit`) checks, the
probes it reads tensors and wrappers with (:mod:`.probes`), its findings and verdicts (:mod:`.result`)."""

from phasetune.features.audit.phase_audit import PhaseAudit, group_names
from phasetune.features.audit.result import CAUSES, AuditError, AuditOptions, AuditResult, Finding

__all__ = ["CAUSES", "AuditError", "AuditOptions", "AuditResult", "Finding", "PhaseAudit", "group_names"]
