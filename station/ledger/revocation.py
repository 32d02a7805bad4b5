"""A revocation that holds: what a revoked board may no longer do.

A board an admin revoked (stolen, returned, compromised) stays ``revoked`` on
every channel: the HTTP API, the serial line and the CLI alike are refused
``device-revoked`` when they ask for a key step, a certificate or a challenge
for it. Only ``Ledger.issue(..., reprovision=True, reason=...)`` (an operator or
admin, never a board token) brings it back, and that is audited
(``device.reprovision`` with the reason). A failure recorded on a revoked board
leaves it revoked: a failed board may retry, a revoked one may not.
"""

from __future__ import annotations

from station.errors import ConflictError


def device_revoked(device_id: str) -> ConflictError:
    return ConflictError(
        f"device {device_id!r} is revoked; only an operator re-provisioning it with a "
        "reason brings it back",
        code="device-revoked",
    )
