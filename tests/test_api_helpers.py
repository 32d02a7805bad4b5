"""Shared fixtures and helpers of the API tests (no tests here)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from api.app import create_app
from station.settings import Settings
from tests.csrs import csr_pem, device_name, make_csr

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
ROLES = ("board", "operator", "qa", "admin")


@dataclass
class Api:
    client: TestClient
    tokens: dict[str, str]
    settings: Settings

    def auth(self, role: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}

    def call(self, method: str, path: str, role: str | None = "admin", **kw: Any) -> httpx.Response:
        headers = {**self.auth(role), **kw.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kw)

    def get(self, path: str, role: str | None = "admin", **kw: Any) -> httpx.Response:
        return self.call("GET", path, role, **kw)

    def post(self, path: str, role: str | None = "admin", **kw: Any) -> httpx.Response:
        return self.call("POST", path, role, **kw)

    def batch(self, name: str = "B1", planned: int = 10, template: str = TEMPLATE) -> None:
        body = {
            "name": name,
            "product": "artik-530",
            "planned_count": planned,
            "subject_template": template,
        }
        r = self.post("/v1/batches", "operator", json=body)
        assert r.status_code == 201, r.text


def new_csr(
    device_id: str, key: ec.EllipticCurvePrivateKey | None = None, **subject: str
) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = device_name(device_id)
    if subject:
        from tests.csrs import name as make_name

        name = make_name(**{"O": "company", "OU": "team", "CN": device_id, "C": "US", **subject})
    csr, _ = make_csr(name, key)
    return csr_pem(csr).decode(), key


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


def make_api(settings: Settings) -> Iterator[Api]:
    app = create_app(settings)
    with TestClient(app) as client:
        ledger = app.state.station.ledger
        tokens = {r: ledger.create_token(f"test-{r}", r) for r in ROLES}
        yield Api(client, tokens, settings)


@pytest.fixture
def api(station_settings: Settings) -> Iterator[Api]:
    yield from make_api(station_settings)
