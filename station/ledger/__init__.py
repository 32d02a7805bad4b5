"""The ledger: which board got which certificate, from which batch, on which station.

``Ledger`` is the service every front end calls (CLI, HTTP API, serial line);
``schema`` holds the tables, ``audit`` the hash chain, ``db`` engines and migrations.
"""

from station.ledger.audit import BrokenLink
from station.ledger.records import (
    AuditReport,
    Batch,
    CertificateRecord,
    Device,
    IssueResult,
    RecoveryReport,
)
from station.ledger.schema import BatchState, CertState, DeviceState, KeyMode
from station.ledger.service import ADHOC_BATCH, AS_PRESENTED, TOKEN_ROLES, Ledger

__all__ = [
    "ADHOC_BATCH",
    "AS_PRESENTED",
    "TOKEN_ROLES",
    "AuditReport",
    "Batch",
    "BatchState",
    "BrokenLink",
    "CertState",
    "CertificateRecord",
    "Device",
    "DeviceState",
    "IssueResult",
    "KeyMode",
    "Ledger",
    "RecoveryReport",
]
