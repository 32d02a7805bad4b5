"""The README's role table, walked: every route it lists, with no token, a wrong
token and each role's token, against the real server; and every route the app
serves is in the table (so a route added without a row fails here)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from tests.fixtures.hsm import settings_for
from tests.live import live_api_for
from tests.test_api_auth import ENROLLMENT_ROUTES, app_routes
from tests.test_api_helpers import ROLES, Api, assert_problem, new_csr

README = Path(__file__).resolve().parent.parent / "README.md"
VERDICTS = {"public", "yes", "-"}

# Minimal bodies: an allowed role may get a 4xx from validation or the ledger,
# never 401/403. Keyed by (method, path with every {param} written {}).
BODIES: dict[tuple[str, str], object] = {
    ("POST", "/v1/certificates"): {"batch": "B1", "device_id": "d", "csr": "x"},
    ("POST", "/v1/devices/{}/proof"): {"nonce": "AAAA", "signature": "AAAA"},
    ("POST", "/v1/batches"): {"name": "x"},
    ("POST", "/v1/devices/{}/revoke"): {"reason": "test"},
    ("POST", "/v1/tokens"): {"name": "", "role": "qa"},
}
# What fills a path parameter, by the path's first segment.
FILL = {"batches": "B1", "devices": "d", "tokens": "nobody"}


def _norm(path: str) -> str:
    return re.sub(r"\{[^/}]+\}", "{}", path)


def readme_table() -> dict[tuple[str, str], dict[str, str]]:
    """(method, normalised path) -> {role: public | yes | -}, from the README."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*route\s*\|", line))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert header[1:] == list(ROLES), header
    table: dict[tuple[str, str], dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        verdicts = dict(zip(ROLES, cells[1:], strict=True))
        assert set(verdicts.values()) <= VERDICTS, line
        method = None
        for item in re.findall(r"`([^`]+)`", cells[0]):
            parts = item.split()
            if len(parts) == 2:
                method, path = parts
            else:
                path = parts[0]
            assert method is not None, line
            optional = re.fullmatch(r"(.*)\[(.*)\](.*)", path)
            paths = (
                [optional[1] + optional[3], optional[1] + optional[2] + optional[3]]
                if optional
                else [path]
            )
            for p in paths:
                key = (method, _norm(p.removesuffix("/*")))
                assert key not in table, f"{key} is in the table twice"
                table[key] = verdicts
    return table


def concrete(path: str) -> str:
    if path == "/static":
        return "/static/app.js"
    segments = path.strip("/").split("/")
    fill = FILL.get(segments[1] if len(segments) > 1 else "", "x")
    return path.replace("{}", fill)


def enrollment_table() -> set[tuple[str, str]]:
    """(method, normalised path) of the README's table of enrollment routes (EST, CMP),
    which authenticate in their own protocol, not with a bearer role."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| enrollment route |"))
    out: set[tuple[str, str]] = set()
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        for item in re.findall(r"`((?:GET|POST) [^`]+)`", line.split("|")[1]):
            method, path = item.split()
            optional = re.findall(r"\[([^\]]*)\]", path)
            variants = [path]
            for opt in optional:
                variants = [v.replace(f"[{opt}]", r) for v in variants for r in ("", opt)]
            out |= {(method, _norm(v)) for v in variants}
    return out


def test_the_table_lists_every_route_the_app_serves(station_settings: Any) -> None:
    served = {(m, _norm(p)) for m, p in app_routes(create_app(station_settings))}
    enrollment = enrollment_table()
    assert enrollment == {(m, _norm(p)) for m, p in ENROLLMENT_ROUTES}
    served -= enrollment
    listed = set(readme_table())
    assert served == listed, (
        f"served but not in the README: {sorted(served - listed)}; "
        f"in the README but not served: {sorted(listed - served)}"
    )


@pytest.fixture
def walk_api(ca_home: Path, tmp_path: Path) -> Iterator[Api]:
    # Many wrong tokens from one address on purpose: no rate limit in this walk.
    settings = settings_for(ca_home, tmp_path / "walk", auth_failures_per_minute=100_000)
    yield from live_api_for(settings)


def test_every_route_with_every_role_as_the_readme_says(walk_api: Api) -> None:
    api = walk_api
    api.batch()
    checked = 0
    for (method, path), verdicts in sorted(readme_table().items()):
        url = concrete(path)
        body = BODIES.get((method, path))
        kw: dict[str, Any] = {"json": body} if body is not None else {}
        where = f"{method} {url}"
        if set(verdicts.values()) == {"public"}:
            for role in (None, *ROLES):
                r = api.call(method, url, role, **kw)
                assert r.status_code not in (401, 403), (where, role, r.text)
            continue
        assert_problem(api.call(method, url, None, **kw), 401, "unauthorized")
        r = api.client.request(method, url, headers={"Authorization": "Bearer wrong"}, **kw)
        assert_problem(r, 401, "unauthorized")
        for role in ROLES:
            r = api.call(method, url, role, **kw)
            if verdicts[role] == "yes":
                assert r.status_code not in (401, 403), (where, role, r.text)
            else:
                assert r.status_code == 403, (where, role, r.text)
            checked += 1
    assert checked >= 4 * 12


def test_the_rules_under_the_table(walk_api: Api) -> None:
    """`reprovision: true` and the `adhoc` batch need operator or admin."""
    api = walk_api
    api.batch()
    pem, _ = new_csr("d-1")
    body = {"batch": "B1", "device_id": "d-1", "csr": pem, "reprovision": True}
    assert_problem(api.post("/v1/certificates", "board", json=body), 403, "forbidden")
    assert api.post("/v1/certificates", "operator", json=body).status_code == 201
    body = {"batch": "adhoc", "device_id": "d-1", "csr": pem}
    assert_problem(api.post("/v1/certificates", "board", json=body), 403, "adhoc-needs-operator")
