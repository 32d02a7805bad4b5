"""Issue 15's ledger rules on both backends (SQLite and PostgreSQL started by the
fixtures): migration 0003, tokens' expiry and last use, challenges bounded and
spent, a revoked board refused, text rules."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from firmware_hooks.protocol import proof_message
from station.ca import CertificateAuthority
from station.errors import StationError
from station.ledger import Ledger
from station.ledger.schema import challenges
from tests.test_api_helpers import TEMPLATE, new_csr, sign


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with Ledger(ledger_url, "test-station") as led:
        yield led


def code_of(fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(StationError) as info:
        fn(*args, **kw)
    return info.value.code


def rows(ledger: Ledger) -> int:
    with ledger.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(challenges)).scalar_one())


def test_tokens_expire_and_record_their_last_use(ledger: Ledger) -> None:
    brief = ledger.create_token("brief", "board", expires_in=timedelta(seconds=1))
    ledger.create_token("idle", "qa")
    assert ledger.lookup_token(brief) == ("brief", "board")
    listed = {t.name: t for t in ledger.list_tokens()}
    assert listed["brief"].last_used_at is not None and listed["brief"].expires_at is not None
    assert listed["idle"].last_used_at is None and listed["idle"].expires_at is None
    time.sleep(1.2)  # the expiry itself is what is tested
    assert ledger.lookup_token(brief) is None
    assert ledger.revoke_token("idle").revoked_at is not None
    assert code_of(ledger.revoke_token, "idle") == "unknown-token"


def test_challenges_and_revocation(ledger: Ledger, ca: CertificateAuthority) -> None:
    ledger.create_batch(
        "B1", product="p", planned_count=4, key_mode="board-ecc", subject_template=TEMPLATE
    )
    pem, key = new_csr("d-1")
    ledger.issue("B1", "d-1", pem.encode(), ca)
    pem2, _ = new_csr("d-2")
    ledger.issue("B1", "d-2", pem2.encode(), ca)
    ledger.create_challenge("d-2", ttl=timedelta(seconds=-1))
    for _ in range(20):
        nonce = ledger.create_challenge("d-1")
    assert rows(ledger) == 1  # d-2's expired one purged, d-1's replaced
    ledger.mark_failed("d-1", "test", "left the line")
    assert (
        code_of(ledger.verify_proof, "d-1", nonce, sign(key, proof_message("d-1", nonce)))
        == "bad-state"
    )
    assert (
        code_of(ledger.verify_proof, "d-1", nonce, sign(key, proof_message("d-1", nonce)))
        == "no-challenge"
    )
    assert rows(ledger) == 0

    pem3, _ = new_csr("d-2")
    ledger.revoke("d-2", "stolen")
    assert code_of(ledger.issue, "B1", "d-2", pem3.encode(), ca) == "device-revoked"
    assert code_of(ledger.mark_key_ready, "d-2") == "device-revoked"
    assert code_of(ledger.create_challenge, "d-2") == "device-revoked"
    ledger.mark_failed("d-2", "x", "y")
    assert ledger.get_device("d-2").state == "revoked"
    again = ledger.issue("B1", "d-2", pem3.encode(), ca, reprovision=True, reason="refurbished")
    assert not again.reused and ledger.get_device("d-2").state == "issued"


def test_text_rules(ledger: Ledger) -> None:
    for name in ("a/b", "..", "\u0412-1"):
        assert code_of(ledger.create_batch, name, product="p", planned_count=1,
                       key_mode="board-ecc", subject_template=TEMPLATE) == "bad-batch"  # fmt: skip
    assert code_of(ledger.create_batch, "B2", product="a\x00b", planned_count=1,
                   key_mode="board-ecc", subject_template=TEMPLATE) == "bad-text"  # fmt: skip
