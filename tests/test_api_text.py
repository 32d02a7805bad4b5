"""Control characters in text from users and boards, on SQLite and on PostgreSQL.

PostgreSQL text cannot hold NUL: every request that carried one to SQL answered
500 (psycopg DataError), and SQLite stored it (a product, a revocation reason).
Each is refused with 422 ``bad-text`` before the ledger, and nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.exc import DataError

from tests.fixtures.hsm import settings_for
from tests.test_api_helpers import TEMPLATE, Api, assert_problem, make_api, new_csr


@pytest.fixture
def api_db(ca_home: Path, tmp_path: Path, ledger_url: str) -> Iterator[Api]:
    """The API on a SQLite file and on a fresh PostgreSQL database; batch B1, dev-1 issued."""
    for api in make_api(settings_for(ca_home, tmp_path / "data", database_url=ledger_url)):
        api.batch("B1")
        pem, _ = new_csr("dev-1")
        body = {"batch": "B1", "device_id": "dev-1", "csr": pem}
        assert api.post("/v1/certificates", "board", json=body).status_code == 201
        yield api


def ledger_dump(api: Api) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (audit log included), sorted; but a token's last use,
    which a refused request of a valid token records too."""
    app: FastAPI = api.client.app  # type: ignore[assignment]
    engine = app.state.station.ledger.engine
    with engine.connect() as conn:
        tables = sa.MetaData()
        tables.reflect(conn)
        assert {"audit_log", "batches", "devices", "certificates"} <= set(tables.tables)
        return {
            name: sorted(
                (
                    tuple(r)
                    for r in conn.execute(sa.select(*(c for c in t.c if c.name != "last_used_at")))
                ),
                key=repr,
            )
            for name, t in sorted(tables.tables.items())
        }


NUL_PATHS = [
    ("GET", "/v1/devices/a%00b", None),
    ("POST", "/v1/devices/a%00b/challenge", None),
    ("POST", "/v1/devices/a%00b/proof", {"nonce": "AAAA", "signature": "AAAA"}),
    ("POST", "/v1/devices/a%00b/revoke", {"reason": "x"}),
    ("GET", "/v1/batches/a%00b", None),
    ("POST", "/v1/batches/a%00b/close", None),
    ("GET", "/v1/batches/a%00b/report", None),
    ("GET", "/v1/batches/B1%0A/report?format=pdf", None),
    ("GET", "/v1/devices?batch=a%00b", None),
    ("GET", "/v1/devices?state=a%1Fb", None),
    ("GET", "/v1/whitelist?batch=a%00b", None),
    ("GET", "/v1/devices?a%00=1", None),
]


@pytest.mark.parametrize(("method", "url", "body"), NUL_PATHS)
def test_a_control_character_in_the_path_or_query_is_bad_text(
    api_db: Api, method: str, url: str, body: dict[str, str] | None
) -> None:
    before = ledger_dump(api_db)
    assert_problem(api_db.call(method, url, json=body), 422, "bad-text")
    assert ledger_dump(api_db) == before


def test_a_raw_pem_csr_with_a_control_character_in_its_query_is_bad_text(api_db: Api) -> None:
    pem, _ = new_csr("dev-2")
    before = ledger_dump(api_db)
    for query in ("batch=a%00b&device_id=dev-2", "batch=B1&device_id=dev%002"):
        r = api_db.post(
            f"/v1/certificates?{query}",
            "board",
            headers={"Content-Type": "application/x-pem-file"},
            content=pem.encode(),
        )
        assert_problem(r, 422, "bad-text")
    assert ledger_dump(api_db) == before


def _batch(**over: object) -> dict[str, object]:
    return {"name": "B2", "product": "p", "planned_count": 1, "subject_template": TEMPLATE, **over}


def test_a_control_character_in_a_json_field_is_bad_text(api_db: Api) -> None:
    pem, _ = new_csr("dev-2")
    cases: list[tuple[str, dict[str, object]]] = [
        ("/v1/certificates", {"batch": "a\x00b", "device_id": "dev-2", "csr": pem}),
        ("/v1/certificates", {"batch": "B1", "device_id": "dev\x002", "csr": pem}),
        ("/v1/batches", _batch(product="a\x00b")),
        ("/v1/batches", _batch(product="line\nforged")),
        ("/v1/batches", _batch(product="a\u2028b")),  # not printable, as in a batch name
        ("/v1/batches", _batch(name="B\x002")),
        ("/v1/batches", _batch(subject_template="/O=a\x00b/CN={device_id}")),
        ("/v1/devices/dev-1/revoke", {"reason": "a\x00b"}),
        ("/v1/devices/dev-1/revoke", {"reason": "returned\r\nINFO forged"}),
        ("/v1/devices/dev-1/proof", {"nonce": "AA\x00A", "signature": "AAAA"}),
    ]
    before = ledger_dump(api_db)
    for url, body in cases:
        problem = assert_problem(api_db.post(url, json=body), 422, "bad-text")
        assert [e["type"] for e in problem["errors"]] == ["bad_text"], (url, body)
    assert ledger_dump(api_db) == before
    assert api_db.get("/v1/devices/dev-1").json()["state"] == "issued"


def test_printable_text_in_any_script_is_still_accepted(api_db: Api) -> None:
    r = api_db.post("/v1/batches", json=_batch(name="B-7", product="批次 é Artik $5 😀"))
    assert r.status_code == 201, r.text
    assert r.json()["product"] == "批次 é Artik $5 😀"
    r = api_db.post("/v1/devices/dev-1/revoke", json={"reason": "returned: cracked, \\ & $"})
    assert r.status_code == 200, r.text


def test_bad_text_beside_another_error_is_invalid_request(api_db: Api) -> None:
    r = api_db.post("/v1/batches", json=_batch(product="a\x00b", planned_count=0))
    body = assert_problem(r, 422, "invalid-request")
    assert {e["type"] for e in body["errors"]} == {"bad_text", "greater_than_equal"}


@pytest.fixture
def pg_api(ca_home: Path, tmp_path: Path, pg_database: str) -> Iterator[Api]:
    yield from make_api(settings_for(ca_home, tmp_path / "data", database_url=pg_database))


def test_a_value_the_database_refuses_is_bad_input_not_a_500(pg_api: Api) -> None:
    """The safety net under the checks: PostgreSQL refusing a value a future field lets
    through (here NUL, sent by a route added for the test) is a 400, not a 500."""
    app: FastAPI = pg_api.client.app  # type: ignore[assignment]
    engine = app.state.station.ledger.engine

    def echo(text: str) -> str:
        with engine.connect() as conn:
            return str(conn.execute(sa.select(sa.literal(text, sa.Text))).scalar_one())

    app.add_api_route("/test/echo", echo, methods=["POST"])
    assert pg_api.post("/test/echo", params={"text": "ok"}).json() == "ok"
    with pytest.raises(DataError):
        echo("a\x00b")
    app.add_api_route("/test/nul", lambda: echo("a\x00b"), methods=["POST"])
    assert_problem(pg_api.post("/test/nul"), 400, "bad-input")
