"""Every route against every role and no token: 401 without, 403 for the wrong role.

The matrix must name every route the app serves (checked against ``app.routes``,
not only the OpenAPI schema), so a route added without an entry here fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.routing import Mount

from api.app import create_app
from station.settings import Settings
from tests.test_api_helpers import ROLES, Api, api, assert_problem

__all__ = ["api"]

ANY = frozenset(ROLES)
BOARD_UP = frozenset({"board", "operator", "admin"})
OPERATOR_UP = frozenset({"operator", "admin"})
READERS = frozenset({"operator", "qa", "admin"})
ADMIN = frozenset({"admin"})

# (method, route template, concrete path, json body, roles allowed). Bodies are
# minimal: an allowed role may get a 4xx from validation or the ledger, never 401/403.
ROUTES: list[tuple[str, str, str, object, frozenset[str]]] = [
    ("GET", "/v1/ca", "/v1/ca", None, ANY),
    ("POST", "/v1/certificates", "/v1/certificates",
     {"batch": "B1", "device_id": "d", "csr": "x"}, BOARD_UP),
    ("POST", "/v1/devices/{device_id}/challenge", "/v1/devices/d/challenge", None, BOARD_UP),
    ("POST", "/v1/devices/{device_id}/proof", "/v1/devices/d/proof",
     {"nonce": "AAAA", "signature": "AAAA"}, BOARD_UP),
    ("POST", "/v1/batches", "/v1/batches", {"name": "x"}, OPERATOR_UP),
    ("POST", "/v1/batches/{name}/close", "/v1/batches/none/close", None, OPERATOR_UP),
    ("GET", "/v1/batches", "/v1/batches", None, READERS),
    ("GET", "/v1/batches/{name}", "/v1/batches/B1", None, READERS),
    ("GET", "/v1/batches/{name}/report", "/v1/batches/B1/report", None, READERS),
    ("GET", "/v1/devices", "/v1/devices", None, READERS),
    ("GET", "/v1/devices/{device_id}", "/v1/devices/d", None, READERS),
    ("GET", "/v1/whitelist", "/v1/whitelist", None, READERS),
    ("GET", "/v1/line/status", "/v1/line/status", None, READERS),
    ("POST", "/v1/devices/{device_id}/revoke", "/v1/devices/d/revoke", {"reason": "test"}, ADMIN),
    ("POST", "/v1/tokens", "/v1/tokens", {"name": "", "role": "qa"}, ADMIN),
    ("GET", "/v1/tokens", "/v1/tokens", None, ADMIN),
    ("DELETE", "/v1/tokens/{name}", "/v1/tokens/nobody", None, ADMIN),
]  # fmt: skip

# Served to anyone: the dashboard page and its files, health, metrics, the API's description,
# and what relying parties fetch (the CRL, OCSP answers).
PUBLIC_ROUTES = {
    ("GET", "/crl"),
    ("POST", "/ocsp"),
    ("GET", "/ocsp/{encoded:path}"),
    ("GET", "/"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/static"),
}
PUBLIC = ["/", "/healthz", "/metrics", "/openapi.json", "/static/app.js", "/crl"]

# Standard enrollment authenticates in its own protocol, not with a bearer role:
# EST cacerts/csrattrs are public (RFC 7030), simpleenroll takes a board token as the
# Basic password (serverkeygen too), simplereenroll the current certificate over TLS
# (tests/test_est.py, tests/test_est_serverkeygen.py);
# CMP messages carry their own protection (tests/test_cmp.py).
ENROLLMENT_ROUTES = {
    ("GET", "/.well-known/est/cacerts"),
    ("GET", "/.well-known/est/{label}/cacerts"),
    ("GET", "/.well-known/est/csrattrs"),
    ("GET", "/.well-known/est/{label}/csrattrs"),
    ("POST", "/.well-known/est/simpleenroll"),
    ("POST", "/.well-known/est/{label}/simpleenroll"),
    ("POST", "/.well-known/est/simplereenroll"),
    ("POST", "/.well-known/est/{label}/simplereenroll"),
    ("POST", "/.well-known/est/serverkeygen"),
    ("POST", "/.well-known/est/{label}/serverkeygen"),
    ("POST", "/.well-known/cmp/p/{label}"),
    ("POST", "/.well-known/cmp/p/{label}/{operation}"),
}


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves; a mount counts as GET."""
    try:  # FastAPI >= 0.160 wraps included routers; this walks into them
        from fastapi.routing import iter_route_contexts

        contexts = [(c.path, c.methods, c.route) for c in iter_route_contexts(app.routes)]
    except ImportError:  # pragma: no cover - older FastAPI: routes are flat
        contexts = [(r.path, getattr(r, "methods", None), r) for r in app.routes]  # type: ignore[attr-defined]
    out: set[tuple[str, str]] = set()
    for path, methods, route in contexts:
        assert path is not None
        if isinstance(route, Mount):
            out.add(("GET", path))
            continue
        out |= {(m, path) for m in methods or () if m != "HEAD"}
    return out


@pytest.fixture
def bare_app(station_settings: Settings) -> Iterator[FastAPI]:
    yield create_app(station_settings)


def test_matrix_covers_every_route_of_the_app(bare_app: FastAPI) -> None:
    served = app_routes(bare_app)
    matrix = {(m, template) for m, template, *_ in ROUTES}
    assert len(matrix) == len(ROUTES), "a route is in the matrix twice"
    assert served - PUBLIC_ROUTES - ENROLLMENT_ROUTES == matrix, (
        f"not in the matrix: {sorted(served - PUBLIC_ROUTES - ENROLLMENT_ROUTES - matrix)}; "
        f"not served: {sorted(matrix - served)}"
    )
    assert served >= PUBLIC_ROUTES | ENROLLMENT_ROUTES


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/est/simpleenroll",
        "/.well-known/est/B1/simpleenroll",
        "/.well-known/est/simplereenroll",
        "/.well-known/est/B1/simplereenroll",
    ],
)
def test_est_enrolment_without_credentials_is_401(bare_app: FastAPI, path: str) -> None:
    from fastapi.testclient import TestClient

    with TestClient(bare_app) as client:
        r = client.post(path, content=b"AAAA", headers={"Content-Type": "application/pkcs10"})
    assert r.status_code == 401, r.text


def test_matrix_covers_every_operation_of_the_schema(bare_app: FastAPI) -> None:
    schema = bare_app.openapi()["paths"]
    # the schema spells a path parameter without its converter
    spelled = {"/ocsp/{encoded}": "/ocsp/{encoded:path}"}
    declared = {(m.upper(), spelled.get(p, p)) for p, ops in schema.items() for m in ops}
    assert declared - PUBLIC_ROUTES == {(m, template) for m, template, *_ in ROUTES}


def test_concrete_paths_match_their_templates() -> None:
    import re

    for _, template, path, _, _ in ROUTES:
        pattern = "^" + re.sub(r"\{[^/]+\}", "[^/]+", template) + "$"
        assert re.match(pattern, path), (template, path)


@pytest.mark.parametrize(
    ("method", "template", "path", "body", "allowed"),
    ROUTES,
    ids=[f"{m} {t}" for m, t, *_ in ROUTES],
)
def test_route_roles(
    api: Api, method: str, template: str, path: str, body: object, allowed: frozenset[str]
) -> None:
    api.batch()
    kw: dict[str, Any] = {"json": body} if body is not None else {}
    assert_problem(api.call(method, path, None, **kw), 401, "unauthorized")
    r = api.client.request(method, path, headers={"Authorization": "Bearer wrong"}, **kw)
    assert_problem(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    r = api.client.request(method, path, headers={"Authorization": "Basic Zm9vOmJhcg=="}, **kw)
    assert r.status_code == 401, r.text
    for role in ROLES:
        r = api.call(method, path, role, **kw)
        if role in allowed:
            assert r.status_code not in (401, 403), (role, r.text)
        else:
            assert_problem(r, 403, "forbidden")


@pytest.mark.parametrize("path", PUBLIC)
def test_public_routes(api: Api, path: str) -> None:
    assert api.client.get(path).status_code == 200


def test_settings_path_is_unused_by_the_route_listing(tmp_path: Path) -> None:
    """Listing routes needs no CA or ledger (the app opens them lazily)."""
    app = create_app(Settings(data_dir=tmp_path / "nothing", station_id="x"))
    assert ("POST", "/v1/certificates") in app_routes(app)
