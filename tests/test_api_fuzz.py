"""The whole HTTP API fuzzed from its own OpenAPI schema (schemathesis, in process over ASGI).

Every operation gets a fixed number of generated requests, valid by the schema
and invalid, made with an admin token against an app with a real ledger and the
run's SoftHSM CA. Every default check of schemathesis is on: no 5xx, status
codes, content types, headers and bodies as the schema declares them, invalid
data refused, valid data accepted. ``derandomize`` makes each run the same.

(schemathesis.pytest.from_fixture does not work with this pytest; the schema is
loaded from the app inside the test and each operation's strategy is driven by
hypothesis directly, which is what ``parametrize`` does.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from api.app import create_app
from station.ledger import Ledger
from station.settings import Settings

EXAMPLES_PER_OPERATION = 60

# Two settings, each for a reason:
# - the API ignores query parameters it does not know, like most HTTP APIs, so
#   requests with made-up extra parameters are not "invalid" here;
# - some rules cannot be written in JSON Schema: a CSR's content, a subject
#   template that must parse and name {device_id} once, base64 in the proof. A
#   schema-valid request may be refused there, with 400/422 and a reason code.
#   Every other operation must accept all schema-valid data.
CONFIG = SchemathesisConfig.from_str(
    """
[generation]
allow-extra-parameters = false

[[operations]]
include-path-regex = "^/v1/(certificates|batches|devices/[{]device_id[}]/proof)$"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "400", "401", "403", "404", "409", "422"
]
"""
)
TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def _operations() -> list[tuple[str, str, GenerationMode]]:
    """(method, path, mode) of every operation in the schema, known without a CA or a ledger.

    Negative mode only where there is something to break (parameters or a body)."""
    spec = create_app(Settings(data_dir=Path("/nonexistent"), station_id="x")).openapi()
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            out.append((method.upper(), path, GenerationMode.POSITIVE))
            if op.get("parameters") or op.get("requestBody"):
                out.append((method.upper(), path, GenerationMode.NEGATIVE))
    return out


OPERATIONS = _operations()


@pytest.fixture
def fuzz_app(station_settings: Settings) -> Iterator[tuple[FastAPI, str]]:
    with Ledger.from_settings(station_settings) as led:
        led.create_batch(
            "B1",
            product="artik530",
            planned_count=10,
            key_mode="board-ecc",
            subject_template=TEMPLATE,
            days=365,
        )
        token = led.create_token("fuzzer", "admin")
    # The fuzzer sends wrong tokens on purpose, from one address: no rate limit here.
    app = create_app(station_settings.model_copy(update={"auth_failures_per_minute": 10**9}))
    yield app, token
    app.state.station.close()


@pytest.mark.parametrize(
    ("method", "path", "mode"), OPERATIONS, ids=[f"{m} {p} {g.value}" for m, p, g in OPERATIONS]
)
def test_operation_conforms_to_the_schema(
    fuzz_app: tuple[FastAPI, str], method: str, path: str, mode: GenerationMode
) -> None:
    app, token = fuzz_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    operation = schema[path][method]
    headers = {"Authorization": f"Bearer {token}"}

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers)

    check()


# ------------------------------------------------------------------ what the fuzzing found


def test_errors_are_documented_as_problem_json(fuzz_app: tuple[FastAPI, str]) -> None:
    app, _ = fuzz_app
    spec = app.openapi()
    assert "Problem" in spec["components"]["schemas"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            default = op["responses"]["default"]
            assert list(default["content"]) == ["application/problem+json"], (method, path)
            if "422" in op["responses"]:
                assert list(op["responses"]["422"]["content"]) == ["application/problem+json"]


def test_listing_batches_in_an_unknown_state_is_refused(fuzz_app: tuple[FastAPI, str]) -> None:
    """It used to answer 200 [] (the ledger filters by any string), unlike GET /v1/devices."""
    from fastapi.testclient import TestClient

    app, token = fuzz_app
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {token}"}
        r = client.get("/v1/batches", params={"state": "opne"}, headers=headers)
        assert r.status_code == 422 and r.json()["code"] == "bad-state", r.text
        assert [
            b["name"] for b in client.get("/v1/batches?state=open", headers=headers).json()["items"]
        ] == ["B1"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/devices?offset=99999999999999999999", None),
        (f"/v1/devices?offset={2**63}", None),
        ("/v1/batches", {"name": "big", "product": "p", "planned_count": 2**31,
                         "subject_template": TEMPLATE}),
        ("/v1/batches", {"name": "huge", "product": "p", "planned_count": 10**30,
                         "subject_template": TEMPLATE}),
        ("/v1/tokens", {"name": "line-1\n2026-11-29 admin logged in", "role": "qa"}),
        ("/v1/tokens", {"name": "nul\u0000", "role": "qa"}),
        ("/v1/batches", {"name": "t", "product": "p", "planned_count": 1,
                         "subject_template": "/CN={device_id}" + "/O=x" * 5000}),
    ],
    ids=["offset-huge", "offset-2^63", "planned-2^31", "planned-10^30", "token-newline",
         "token-nul", "template-5000-attributes"],
)  # fmt: skip
def test_out_of_range_values_are_422_not_500(
    fuzz_app: tuple[FastAPI, str], path: str, body: object
) -> None:
    """Hand-made after the fuzzing: numbers past the database's integers were HTTP 500;
    control characters in a token name and a 20 kB subject template were accepted."""
    from fastapi.testclient import TestClient

    app, token = fuzz_app
    with TestClient(app, raise_server_exceptions=False) as client:
        headers = {"Authorization": f"Bearer {token}"}
        if body is None:
            r = client.get(path, headers=headers)
        else:
            r = client.post(path, json=body, headers=headers)
        assert r.status_code == 422 and r.json()["code"] == "invalid-request", r.text
