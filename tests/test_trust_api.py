"""Issue 15, the HTTP side: what a hostile client on the factory network tried,
against the real server (uvicorn on 127.0.0.1), each refusal with its reason code."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from station.ledger import Ledger
from tests.csrs import csr_pem, make_csr
from tests.fixtures.hsm import settings_for
from tests.live import live_api_for
from tests.test_api_helpers import Api, assert_problem, new_csr

__all__ = ["live_api"]
from tests.live import live_api


def hostile_adhoc_subject() -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.USER_ID, "0"),
            x509.NameAttribute(ObjectIdentifier("2.5.4.72"), "role-admin"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "root@example.com"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "ADMIN"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Amazon Web Services\u202eevil"),
            x509.NameAttribute(NameOID.COMMON_NAME, "adhoc-1"),
        ]
    )


def _adhoc(api: Api) -> None:
    with Ledger.from_settings(api.settings) as ledger:
        ledger.ensure_adhoc_batch()


# -- 2: the adhoc batch and the subject allow-list ------------------------------------


def test_board_tokens_cannot_use_the_adhoc_batch(live_api: Api) -> None:
    _adhoc(live_api)
    csr, _ = make_csr(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "adhoc-1")]))
    body = {"batch": "adhoc", "device_id": "adhoc-1", "csr": csr_pem(csr).decode()}
    r = live_api.post("/v1/certificates", "board", json=body)
    assert_problem(r, 403, "adhoc-needs-operator")
    # Raw PEM with the batch in the query: the same refusal.
    r = live_api.post(
        "/v1/certificates?batch=adhoc&device_id=adhoc-1",
        "board",
        content=csr_pem(csr),
        headers={"Content-Type": "application/x-pem-file"},
    )
    assert_problem(r, 403, "adhoc-needs-operator")
    # An operator may.
    r = live_api.post("/v1/certificates", "operator", json=body)
    assert r.status_code == 201, r.text


def test_the_hostile_adhoc_subject_is_refused_even_to_an_operator(live_api: Api) -> None:
    _adhoc(live_api)
    csr, _ = make_csr(hostile_adhoc_subject())
    body = {"batch": "adhoc", "device_id": "adhoc-1", "csr": csr_pem(csr).decode()}
    r = live_api.post("/v1/certificates", "operator", json=body)
    assert_problem(r, 422, "subject-attribute-not-allowed")
    assert live_api.get("/v1/devices/adhoc-1").status_code == 404


def test_a_batch_template_outside_the_allow_list_is_refused(live_api: Api) -> None:
    for template, code in (
        ("/O=company/emailAddress=root@example.com/CN={device_id}", "bad-template"),
        ("/O=Amazon Web Services\u202eevil/CN={device_id}", "bad-subject"),
        ("/O=com\u200bpany/CN={device_id}", "bad-subject"),
    ):
        body = {"name": "T", "product": "p", "planned_count": 1, "subject_template": template}
        assert_problem(live_api.post("/v1/batches", "operator", json=body), 422, code)


# -- 7: explicit curve parameters -----------------------------------------------------


def explicit_params_csr(tmp_path: Path, cn: str) -> bytes:
    key = tmp_path / "explicit.pem"
    subprocess.run(
        [
            *("openssl", "ecparam", "-name", "prime256v1", "-param_enc", "explicit"),
            *("-genkey", "-noout", "-out", str(key)),
        ],
        check=True,
        capture_output=True,
    )
    return subprocess.run(
        [
            *("openssl", "req", "-new", "-sha256", "-key", str(key)),
            *("-subj", f"/O=company/OU=team/CN={cn}/C=US"),
        ],
        check=True,
        capture_output=True,
    ).stdout


def test_explicit_curve_parameters_are_refused(live_api: Api, tmp_path: Path) -> None:
    pem = explicit_params_csr(tmp_path, "exp-1")
    assert b"BEGIN CERTIFICATE REQUEST" in pem
    live_api.batch()
    body = {"batch": "B1", "device_id": "exp-1", "csr": pem.decode()}
    assert_problem(
        live_api.post("/v1/certificates", "board", json=body), 422, "explicit-curve-params"
    )


# -- 6: failed authentications are limited per address ---------------------------------


@pytest.fixture
def strict_api(ca_home: Path, tmp_path: Path) -> Iterator[Api]:
    yield from live_api_for(settings_for(ca_home, tmp_path / "strict", auth_failures_per_minute=5))


def test_failed_authentications_are_limited_per_address(strict_api: Api) -> None:
    bad = {"Authorization": "Bearer not-a-token"}
    for _ in range(5):
        assert_problem(
            strict_api.call("GET", "/v1/batches", None, headers=bad), 401, "unauthorized"
        )
    r = strict_api.call("GET", "/v1/batches", None, headers=bad)
    body = assert_problem(r, 429, "too-many-auth-failures")
    assert int(r.headers["retry-after"]) >= 1
    assert "not-a-token" not in str(body)
    # The address is held back, whatever token it sends now.
    assert_problem(strict_api.get("/v1/batches", "operator"), 429, "too-many-auth-failures")
    # Public routes still answer; the counters are in /metrics.
    text = strict_api.get("/metrics", None).text
    assert "station_auth_failures_total 5.0" in text, text
    assert "station_auth_rate_limited_total 2.0" in text, text


def test_est_failures_count_against_the_address_too(strict_api: Api) -> None:
    """Found in review: EST authenticated without the client's address, so its failures
    went to one shared bucket: a guesser locked out every EST client and was never
    held back on the other routes."""
    bad = {
        "Authorization": "Basic " + base64.b64encode(b"board:not-a-token").decode(),
        "Content-Type": "application/pkcs10",
    }
    for _ in range(5):
        r = strict_api.call(
            "POST", "/.well-known/est/simpleenroll", None, content=b"MIIB", headers=bad
        )
        assert r.status_code == 401, r.text
    assert_problem(strict_api.get("/v1/batches", "operator"), 429, "too-many-auth-failures")


# -- 8: public endpoints say a status and a code, no more -------------------------------


@pytest.fixture
def broken_api(ca_home: Path, tmp_path: Path) -> Iterator[Api]:
    secret = tmp_path / "secret-place" / "ca-pin"
    uri = (
        "pkcs11:token=hidden-label;object=ca-key"
        f"?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source={secret}"
    )
    yield from live_api_for(settings_for(ca_home, tmp_path / "broken", ca_key_uri=uri))


def test_a_failing_healthz_names_no_path_module_or_label(broken_api: Api) -> None:
    r = broken_api.get("/healthz", None)
    body = assert_problem(r, 503, r.json()["code"])
    for secret in ("secret-place", "ca-pin", "libsofthsm2", "hidden-label", "/usr/lib"):
        assert secret not in r.text, r.text
    assert body["checks"]["token"]["status"] == "failing"
    assert body["checks"]["token"]["code"]
    assert set(body["checks"]["token"]) == {"status", "code"}
    # An operator (and admin) gets the details.
    r = broken_api.get("/healthz", "operator")
    assert r.status_code == 503
    assert "hidden-label" in r.text or "secret-place" in r.text, r.text
    # A board token is no reader: public answer.
    assert "hidden-label" not in broken_api.get("/healthz", "board").text


def test_public_metrics_show_no_batches_or_board_counts(live_api: Api) -> None:
    live_api.batch("Secret-Batch-7")
    pem, _ = new_csr("m-1")
    body = {"batch": "Secret-Batch-7", "device_id": "m-1", "csr": pem}
    assert live_api.post("/v1/certificates", "board", json=body).status_code == 201
    public = live_api.get("/metrics", None)
    assert public.status_code == 200
    assert "Secret-Batch-7" not in public.text
    assert "station_boards" not in public.text
    for role in ("operator", "qa", "admin"):
        assert "Secret-Batch-7" in live_api.get("/metrics", role).text
    assert "Secret-Batch-7" not in live_api.get("/metrics", "board").text


# -- 13: /docs without a CDN, security headers on HTML ----------------------------------


def test_docs_load_nothing_from_a_cdn(live_api: Api) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        r = live_api.get(path, None)
        assert r.status_code == 404 or "cdn" not in r.text.lower(), (path, r.text[:200])
    assert live_api.get("/openapi.json", None).status_code == 200


def test_html_answers_carry_csp_frame_and_sniffing_headers(live_api: Api) -> None:
    live_api.batch()
    for path, role in (("/", None), ("/v1/batches/B1/report?format=html", "qa")):
        r = live_api.get(path, role)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src" in csp and "frame-ancestors 'none'" in csp
        assert "script-src 'self'" in csp or "script-src 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
    assert live_api.get("/v1/ca", "board").headers["x-content-type-options"] == "nosniff"
