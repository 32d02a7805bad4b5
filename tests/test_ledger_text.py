"""Text rules in the ledger itself (issue 15, item 12): whatever channel calls it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from station.errors import PolicyError
from station.ledger import Ledger
from station.settings import Settings
from tests.live import live_api
from tests.test_api_helpers import TEMPLATE, Api, assert_problem

__all__ = ["live_api"]


@pytest.fixture
def ledger(station_settings: Settings) -> Iterator[Ledger]:
    with Ledger.from_settings(station_settings) as led:
        yield led


def batch(ledger: Ledger, name: str = "B1", **kw: str) -> None:
    args = {"product": "p", "subject_template": TEMPLATE, **kw}
    ledger.create_batch(name, planned_count=1, key_mode="board-ecc", **args)  # type: ignore[arg-type]


def code_of(fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyError) as info:
        fn(*args, **kw)
    return info.value.code


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "a/b",
        ".",
        "..",
        ".hidden",
        "\u0412-1",  # Cyrillic VE: looks like B-1
        "B\u20111",  # non-breaking hyphen
        "B 1",
        "B\n1",
        "",
        "x" * 129,
    ],
)
def test_batch_names_are_identifiers(ledger: Ledger, name: str) -> None:
    assert code_of(batch, ledger, name) == "bad-batch"


def test_good_batch_names_pass(ledger: Ledger) -> None:
    for name in ("B-2026-11-29", "line1_batch.7", "x" * 128):
        batch(ledger, name)


@pytest.mark.parametrize(
    "value", ["evil\nINFO forged", "a\x00b", "a\u202eb", "a\u200bb", "a\tb", "", "x" * 129]
)
def test_product_and_operator_are_printable(ledger: Ledger, value: str) -> None:
    assert code_of(batch, ledger, product=value) == "bad-text"
    assert code_of(batch, ledger, operator=value) == "bad-text"


def test_reasons_and_token_names_are_printable(ledger: Ledger) -> None:
    assert code_of(ledger.revoke, "d", "stolen\nINFO forged") == "bad-text"
    assert code_of(ledger.create_token, "a\u202eb", "qa") == "bad-token-name"


def test_failure_messages_are_cleaned_not_refused(ledger: Ledger) -> None:
    batch(ledger)
    ledger.register_device("B1", "d-1")
    device = ledger.mark_failed("d-1", "x\ny", "board said\nINFO forged\x00")
    assert device.failure_code == "x\ufffdy"
    assert device.failure_message == "board said\ufffdINFO forged\ufffd"


def test_a_slash_name_is_refused_over_http_not_created(live_api: Api) -> None:
    body = {"name": "a/b", "product": "p", "planned_count": 1, "subject_template": TEMPLATE}
    assert_problem(live_api.post("/v1/batches", "operator", json=body), 422, "bad-batch")
    assert live_api.get("/v1/batches").json()["items"] == []
