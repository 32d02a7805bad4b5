"""The planned count is about boards shipped: a failed board does not use up the plan.

Rule (README, "Batches"): a batch takes a new board while fewer than
``planned_count`` of its boards are not ``failed``. A failed board keeps its
place in the ledger and the report (enrolled, failed, by reason) but not in the
plan, so a replacement can take it. A failed board may come back (a retry) only
while the plan has room, as a new board would: the plan never overshoots.
Verified, revoked and in-progress boards all count (a revoked board shipped).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from station.ca import CertificateAuthority
from station.ledger import Ledger
from tests.test_ledger import TEMPLATE, make_csr, refused


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with Ledger(ledger_url, "test-station", backdate_seconds=60) as led:
        led.create_batch(
            "B-1", product="p", planned_count=3, key_mode="board-ecc", subject_template=TEMPLATE
        )
        yield led


def fail(ledger: Ledger, device_id: str) -> None:
    ledger.register_device("B-1", device_id)
    ledger.mark_failed(device_id, "link-timeout", "cable fault")


def test_failed_boards_do_not_use_up_the_plan(ledger: Ledger, ca: CertificateAuthority) -> None:
    ledger.issue("B-1", "ok-1", make_csr("ok-1")[0], ca)
    for i in range(5):  # more failures than the plan has places
        fail(ledger, f"bad-{i}")
    # Replacements join, through both ways a board enrols.
    ledger.register_device("B-1", "ok-2")
    ledger.issue("B-1", "ok-3", make_csr("ok-3")[0], ca)
    assert ledger.get_batch("B-1").device_count == 8  # enrolled, failed ones included
    with refused("batch-full"):
        ledger.register_device("B-1", "ok-4")
    with refused("batch-full"):
        ledger.issue("B-1", "ok-4", make_csr("ok-4")[0], ca)


def test_a_failed_board_comes_back_only_while_the_plan_has_room(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    fail(ledger, "bad-0")
    ledger.issue("B-1", "ok-1", make_csr("ok-1")[0], ca)
    # Room for one more: the failed board's retry takes it.
    assert ledger.issue("B-1", "bad-0", make_csr("bad-0")[0], ca).certificate
    fail(ledger, "bad-1")
    ledger.issue("B-1", "ok-2", make_csr("ok-2")[0], ca)
    # The plan is full (bad-0, ok-1, ok-2 live): bad-1 may not come back.
    with refused("batch-full"):
        ledger.issue("B-1", "bad-1", make_csr("bad-1")[0], ca)


def test_revoked_boards_count_against_the_plan(ledger: Ledger, ca: CertificateAuthority) -> None:
    for d in ("a", "b", "c"):
        ledger.issue("B-1", d, make_csr(d)[0], ca)
    ledger.revoke("a", "returned by QA")
    with refused("batch-full"):
        ledger.issue("B-1", "d", make_csr("d")[0], ca)
