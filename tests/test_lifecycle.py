"""The device lifecycle as a table: every state x every event, checked one by one.

The expected table is written out here by hand, apart from the code's, so a
change to station/ledger/lifecycle.py that moves any cell fails a named case.
"""

from __future__ import annotations

import pytest

from station.errors import ConflictError, Kind
from station.ledger.lifecycle import NEEDS_CERTIFICATE, QUIET_WHEN_UNCHANGED, Event, next_state
from station.ledger.schema import DeviceState

N, K, IS, IN, V, F, R = (
    DeviceState.NEW,
    DeviceState.KEY_READY,
    DeviceState.ISSUED,
    DeviceState.INSTALLED,
    DeviceState.VERIFIED,
    DeviceState.FAILED,
    DeviceState.REVOKED,
)
ORDER = (N, K, IS, IN, V, F, R)
BAD = "bad-state"
DONE = "already-provisioned"
GONE = "device-revoked"

# Rows: events; columns: the states in ORDER. A state is where the board goes,
# a string the reason code it is refused with.
EXPECTED: dict[Event, tuple[DeviceState | str, ...]] = {
    # A revoked board stays revoked (issue 15): no key step, no reissue, a failure
    # leaves it revoked; only REPROVISION (an operator, with a reason) takes it out.
    Event.KEY_READY: (K, K, BAD, BAD, DONE, K, GONE),
    Event.ISSUE: (IS, IS, IS, IS, IS, IS, IS),
    Event.REISSUE: (N, K, IS, IN, V, IS, R),
    Event.INSTALL: (BAD, BAD, IN, IN, BAD, BAD, BAD),
    Event.VERIFY: (BAD, BAD, V, V, V, BAD, BAD),
    Event.FAIL: (F, F, F, F, F, F, R),
    Event.REVOKE: (R, R, R, R, R, R, R),
    Event.REPROVISION: (BAD, BAD, BAD, BAD, BAD, BAD, K),
}

CASES = [
    pytest.param(state, event, EXPECTED[event][i], id=f"{state.value}-x-{event.value}")
    for event in Event
    for i, state in enumerate(ORDER)
]


def test_the_expected_table_covers_every_state_and_event() -> None:
    assert set(EXPECTED) == set(Event)
    assert set(ORDER) == set(DeviceState)
    assert all(len(row) == len(ORDER) for row in EXPECTED.values())


@pytest.mark.parametrize(("state", "event", "expected"), CASES)
def test_transition(state: DeviceState, event: Event, expected: DeviceState | str) -> None:
    if isinstance(expected, DeviceState):
        assert next_state(state, event, "dev-1") is expected
        return
    with pytest.raises(ConflictError) as refused:
        next_state(state, event, "dev-1")
    assert refused.value.code == expected
    assert refused.value.kind is Kind.CONFLICT
    assert "'dev-1'" in refused.value.message


def test_a_bad_state_refusal_names_what_the_event_needs() -> None:
    with pytest.raises(ConflictError, match=r"is new; install needs issued or installed"):
        next_state(DeviceState.NEW, Event.INSTALL, "dev-1")


def test_events_that_need_a_live_certificate() -> None:
    assert frozenset({Event.INSTALL, Event.VERIFY}) == NEEDS_CERTIFICATE


def test_events_that_record_nothing_when_the_state_stays() -> None:
    assert frozenset({Event.VERIFY, Event.REISSUE}) == QUIET_WHEN_UNCHANGED
