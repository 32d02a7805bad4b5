"""A board's lifecycle: which event moves it from which state to which.

A pure table (state x event -> state, or a refusal with its reason code),
tested exhaustively in tests/test_lifecycle.py. It knows nothing of storage or
crypto: :mod:`station.ledger.changes` applies it and records the change.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from station.errors import ConflictError
from station.ledger.schema import DeviceState

S = DeviceState


class Event(StrEnum):
    KEY_READY = "key-ready"  # the board holds its key (or the station loaded it)
    ISSUE = "issue"  # a new certificate was committed
    REISSUE = "reissue"  # the board asked again with the same key: same certificate back
    INSTALL = "install"  # the board stored the chain
    VERIFY = "verify"  # proof of possession passed
    FAIL = "fail"
    REVOKE = "revoke"
    # An operator brings a revoked board back, with a reason (the only way out of
    # revoked: station.ledger.revocation).
    REPROVISION = "reprovision"


_EVERY = tuple(S)

TRANSITIONS: Mapping[Event, Mapping[DeviceState, DeviceState]] = {
    Event.KEY_READY: {s: S.KEY_READY for s in (S.NEW, S.KEY_READY, S.FAILED)},
    Event.ISSUE: {s: S.ISSUED for s in _EVERY},
    # A board that failed after issuance is back on the issued step.
    Event.REISSUE: {s: S.ISSUED if s is S.FAILED else s for s in _EVERY},
    Event.INSTALL: {S.ISSUED: S.INSTALLED, S.INSTALLED: S.INSTALLED},
    Event.VERIFY: {S.ISSUED: S.VERIFIED, S.INSTALLED: S.VERIFIED, S.VERIFIED: S.VERIFIED},
    # A failure never takes a board out of revoked (a failed board may retry).
    Event.FAIL: {s: S.REVOKED if s is S.REVOKED else S.FAILED for s in _EVERY},
    Event.REVOKE: {s: S.REVOKED for s in _EVERY},
    Event.REPROVISION: {S.REVOKED: S.KEY_READY},
}

# Refusals with a reason of their own; every other missing entry is bad-state.
_REFUSALS: Mapping[tuple[DeviceState, Event], tuple[str, str]] = {
    (S.VERIFIED, Event.KEY_READY): ("already-provisioned", "is already provisioned and verified"),
    (S.REVOKED, Event.KEY_READY): (
        "device-revoked",
        "is revoked; only an operator re-provisioning it with a reason brings it back",
    ),
}

# The states a proof of possession takes to verified (issued, installed): where a
# board waits for one. Verified boards stay as they are; any other state is refused.
AWAITING_PROOF = frozenset(s for s, t in TRANSITIONS[Event.VERIFY].items() if t is not s)

# Events that need the board's live, issued certificate (checked by the caller,
# which knows the certificate; the table knows only states).
NEEDS_CERTIFICATE = frozenset({Event.INSTALL, Event.VERIFY})

# Events that record nothing when they leave the board where it is (a verified
# board verified again, a board handed back its certificate mid-flow); the
# others are recorded even then (a chain installed again has a new digest).
QUIET_WHEN_UNCHANGED = frozenset({Event.VERIFY, Event.REISSUE})


def next_state(state: DeviceState, event: Event, device_id: str) -> DeviceState:
    """The state ``event`` moves a board in ``state`` to; ConflictError when it may not."""
    target = TRANSITIONS[event].get(state)
    if target is not None:
        return target
    special = _REFUSALS.get((state, event))
    if special is not None:
        code, says = special
        raise ConflictError(f"device {device_id!r} {says}", code=code)
    allowed = " or ".join(TRANSITIONS[event])
    raise ConflictError(
        f"device {device_id!r} is {state.value}; {event.value} needs {allowed}", code="bad-state"
    )
