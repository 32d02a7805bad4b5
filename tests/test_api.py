"""The HTTP API against a real SoftHSM CA and a real SQLite ledger: every endpoint."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_hooks.protocol import proof_message
from tests.csrs import csr_der, device_name, make_csr
from tests.test_api_helpers import Api, api, assert_problem, new_csr, sign

__all__ = ["api"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def issue(api: Api, device_id: str, batch: str = "B1", **kw: object) -> tuple[dict, object]:
    pem, key = new_csr(device_id)
    r = api.post(
        "/v1/certificates", "board", json={"batch": batch, "device_id": device_id, "csr": pem}
    )
    assert r.status_code == 201, r.text
    return r.json(), key


def test_openapi_lists_versioned_routes(api: Api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    for p in (
        "/v1/batches",
        "/v1/batches/{name}",
        "/v1/batches/{name}/close",
        "/v1/certificates",
        "/v1/devices",
        "/v1/devices/{device_id}",
        "/v1/devices/{device_id}/challenge",
        "/v1/devices/{device_id}/proof",
        "/v1/devices/{device_id}/revoke",
        "/v1/whitelist",
        "/v1/ca",
        "/v1/line/status",
        "/healthz",
        "/metrics",
    ):
        assert p in paths, p


def test_batches(api: Api) -> None:
    api.batch("B1", planned=3)
    assert_problem(
        api.post(
            "/v1/batches",
            "operator",
            json={"name": "B1", "product": "x", "planned_count": 1, "subject_template": "*"},
        ),
        409,
        "batch-exists",
    )
    assert_problem(
        api.post(
            "/v1/batches",
            "operator",
            json={"name": "B2", "product": "x", "planned_count": 1, "subject_template": "/O=x"},
        ),
        422,
        "bad-template",
    )
    listed = api.get("/v1/batches", "qa").json()  # a page: items, total, limit, offset
    assert [b["name"] for b in listed["items"]] == ["B1"] and listed["total"] == 1
    got = api.get("/v1/batches/B1", "qa").json()
    assert got["planned_count"] == 3 and got["state"] == "open"
    assert got["operator"] == "test-operator"
    assert_problem(api.get("/v1/batches/nope", "qa"), 404, "unknown-batch")
    closed = api.post("/v1/batches/B1/close", "operator")
    assert closed.status_code == 200 and closed.json()["state"] == "closed"
    assert_problem(api.post("/v1/batches/B1/close", "operator"), 409, "batch-closed")
    pem, _ = new_csr("dev-1")
    r = api.post(
        "/v1/certificates", "board", json={"batch": "B1", "device_id": "dev-1", "csr": pem}
    )
    assert_problem(r, 409, "batch-closed")


def test_full_flow_to_whitelist(api: Api) -> None:
    api.batch()
    pem, key = new_csr("dev-1")
    body = {"batch": "B1", "device_id": "dev-1", "csr": pem}
    r = api.post("/v1/certificates", "board", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    chain = x509.load_pem_x509_certificates(out["chain"].encode())
    assert len(chain) == 2
    assert format(chain[0].serial_number, "x") == out["serial"]
    assert chain[0].subject == device_name("dev-1")
    assert chain[0].issuer == chain[1].subject
    assert out["reused"] is False and len(out["fingerprint"]) == 64

    # Idempotent re-request: same key, same certificate.
    again = api.post("/v1/certificates", "board", json=body)
    assert again.status_code == 200
    assert again.json()["serial"] == out["serial"] and again.json()["reused"] is True

    assert api.get("/v1/devices/dev-1", "qa").json()["state"] == "issued"

    ch = api.post("/v1/devices/dev-1/challenge", "board")
    assert ch.status_code == 200
    nonce = base64.b64decode(ch.json()["nonce"])
    message = base64.b64decode(ch.json()["message"])
    assert message == proof_message("dev-1", nonce)
    proof = {"nonce": ch.json()["nonce"], "signature": _b64(sign(key, message))}
    done = api.post("/v1/devices/dev-1/proof", "board", json=proof)
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "verified" and done.json()["serial"] == out["serial"]

    device = api.get("/v1/devices/dev-1", "qa").json()
    assert device["state"] == "verified" and device["verified_at"]
    listed = api.get("/v1/devices", "qa", params={"batch": "B1", "state": "verified"}).json()
    assert [d["device_id"] for d in listed["items"]] == ["dev-1"] and listed["total"] == 1
    assert api.get("/v1/devices", "qa", params={"state": "failed"}).json()["items"] == []
    assert_problem(api.get("/v1/devices", "qa", params={"state": "bogus"}), 422, "bad-state")
    assert_problem(api.get("/v1/devices/ghost", "qa"), 404, "unknown-device")

    wl = api.get("/v1/whitelist", "qa", headers={"Accept": "application/json"})
    assert wl.headers["content-type"].startswith("application/json")
    entries = wl.json()
    assert [(e["serial"], e["device_id"], e["batch"]) for e in entries] == [
        (out["serial"], "dev-1", "B1")
    ]
    assert entries[0]["fingerprint"] == out["fingerprint"]
    wl_csv = api.get("/v1/whitelist", "qa", headers={"Accept": "text/csv"})
    assert wl_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(wl_csv.text)))
    assert [(r["serial"], r["device_id"]) for r in rows] == [(out["serial"], "dev-1")]
    assert api.get("/v1/whitelist", "qa", params={"batch": "B1"}).json() == entries
    assert_problem(api.get("/v1/whitelist", "qa", params={"batch": "zz"}), 404, "unknown-batch")

    # Revocation (admin): out of the whitelist.
    rv = api.post("/v1/devices/dev-1/revoke", "admin", json={"reason": "returned"})
    assert rv.status_code == 200 and rv.json()["state"] == "revoked"
    assert api.get("/v1/whitelist", "qa").json() == []
    assert_problem(
        api.post("/v1/devices/dev-1/revoke", "admin", json={"reason": "again"}),
        404,
        "no-certificate",
    )


def test_raw_pem_and_der_bodies(api: Api) -> None:
    api.batch()
    pem, _ = new_csr("dev-pem")
    r = api.post(
        "/v1/certificates",
        "board",
        params={"batch": "B1", "device_id": "dev-pem"},
        content=pem.encode(),
        headers={"Content-Type": "application/x-pem-file"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/x-pem-file")
    certs = x509.load_pem_x509_certificates(r.content)
    assert len(certs) == 2
    assert r.headers["x-certificate-serial"] == format(certs[0].serial_number, "x")

    csr, _ = make_csr(device_name("dev-der"))
    r = api.post(
        "/v1/certificates",
        "board",
        params={"batch": "B1", "device_id": "dev-der"},
        content=csr_der(csr),
        headers={"Content-Type": "application/pkcs10"},
    )
    assert r.status_code == 201, r.text
    assert x509.load_pem_x509_certificates(r.content)[0].subject == device_name("dev-der")

    assert_problem(
        api.post(
            "/v1/certificates",
            "board",
            content=pem.encode(),
            headers={"Content-Type": "application/x-pem-file"},
        ),
        422,
        "invalid-request",
    )
    assert_problem(
        api.post("/v1/certificates", "board", content=b"x", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported-media-type",
    )


def test_refusals_are_problems_with_reason_codes(api: Api) -> None:
    api.batch()

    def post(device_id: str, csr: str, batch: str = "B1") -> object:
        return api.post(
            "/v1/certificates", "board", json={"batch": batch, "device_id": device_id, "csr": csr}
        )

    assert_problem(post("d1", "not a csr"), 422, "malformed-csr")
    hostile = (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + "A" * 3000
        + "\n-----END CERTIFICATE REQUEST-----\n"
    )
    assert_problem(post("d1", hostile), 422, "malformed-csr")
    assert_problem(
        api.post(
            "/v1/certificates",
            "board",
            params={"batch": "B1", "device_id": "d1"},
            content=bytes(range(256)) * 4,
            headers={"Content-Type": "application/pkcs10"},
        ),
        422,
        "malformed-csr",
    )
    ca_csr, _ = make_csr(
        device_name("d1"), extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)]
    )
    assert_problem(
        post("d1", ca_csr.public_bytes(serialization.Encoding.PEM).decode()), 422, "ca-requested"
    )
    wrong_org, _ = new_csr("d1", O="evil")
    assert_problem(post("d1", wrong_org), 422, "subject-mismatch")
    pem, key = new_csr("d1")
    assert_problem(post("d1", pem, batch="nope"), 404, "unknown-batch")
    assert post("d1", pem).status_code == 201
    same_key, _ = new_csr("d2", key)
    assert_problem(post("d2", same_key), 409, "duplicate-key")
    other_key, _ = new_csr("d1")
    assert_problem(post("d1", other_key), 409, "already-provisioned")
    # Re-provisioning is an operator's decision, not a board's.
    body = {"batch": "B1", "device_id": "d1", "csr": other_key, "reprovision": True}
    assert_problem(api.post("/v1/certificates", "board", json=body), 403, "forbidden")
    assert api.post("/v1/certificates", "operator", json=body).status_code == 201

    bad = assert_problem(
        api.post("/v1/certificates", "board", json={"batch": "B1"}), 422, "invalid-request"
    )
    assert {tuple(e["loc"]) for e in bad["errors"]} >= {("device_id",), ("csr",)}
    assert_problem(
        api.post(
            "/v1/certificates",
            "board",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        ),
        422,
        "invalid-request",
    )
    assert_problem(api.post("/v1/batches", "operator", json={"name": "x"}), 422, "invalid-request")


def test_body_too_large(api: Api) -> None:
    limit = api.settings.max_body_bytes
    big = json.dumps({"batch": "B1", "device_id": "d", "csr": "A" * limit}).encode()
    r = api.post(
        "/v1/certificates", "board", content=big, headers={"Content-Type": "application/json"}
    )
    assert_problem(r, 413, "body-too-large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted on the stream
        for _ in range(limit // 1024 + 2):
            yield b"A" * 1024

    r = api.post(
        "/v1/certificates",
        "board",
        params={"batch": "B1", "device_id": "d"},
        content=chunks(),
        headers={"Content-Type": "application/x-pem-file"},
    )
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "body-too-large")


def test_proof_refusals(api: Api) -> None:
    api.batch()
    _, key = issue(api, "dev-p")
    # Over HTTP too, the bare nonce is not what a board signs: the proof message is.
    bare_b64 = api.post("/v1/devices/dev-p/challenge", "board").json()["nonce"]
    bare = {"nonce": bare_b64, "signature": _b64(sign(key, base64.b64decode(bare_b64)))}
    assert_problem(api.post("/v1/devices/dev-p/proof", "board", json=bare), 422, "bad-proof")
    nonce_b64 = api.post("/v1/devices/dev-p/challenge", "board").json()["nonce"]
    message = proof_message("dev-p", base64.b64decode(nonce_b64))
    other = ec.generate_private_key(ec.SECP256R1())
    bad = {"nonce": nonce_b64, "signature": base64.b64encode(sign(other, message)).decode()}
    assert_problem(api.post("/v1/devices/dev-p/proof", "board", json=bad), 422, "bad-proof")
    # The nonce was used up by the failed attempt.
    good = {"nonce": nonce_b64, "signature": base64.b64encode(sign(key, message)).decode()}
    assert_problem(api.post("/v1/devices/dev-p/proof", "board", json=good), 422, "no-challenge")
    junk = {"nonce": "***", "signature": "AAAA"}
    assert_problem(api.post("/v1/devices/dev-p/proof", "board", json=junk), 400, "bad-base64")
    assert_problem(api.post("/v1/devices/ghost/challenge", "board"), 404, "unknown-device")
    assert api.get("/v1/devices/dev-p", "qa").json()["state"] == "issued"


def test_ca_chain(api: Api) -> None:
    r = api.get("/v1/ca", "board")
    assert r.headers["content-type"].startswith("application/x-pem-file")
    ca = x509.load_pem_x509_certificates(r.content)[0]
    info = api.get("/v1/ca", "qa", headers={"Accept": "application/json"}).json()
    assert info["serial"] == format(ca.serial_number, "x")
    assert info["chain"].encode() == r.content


def test_admin_creates_tokens(api: Api) -> None:
    r = api.post("/v1/tokens", "admin", json={"name": "qa-2", "role": "qa"})
    assert r.status_code == 201
    token = r.json()["token"]
    h = {"Authorization": f"Bearer {token}"}
    assert api.client.get("/v1/devices", headers=h).status_code == 200
    assert_problem(api.client.post("/v1/batches/B1/close", headers=h), 403, "forbidden")
    assert_problem(
        api.post("/v1/tokens", "admin", json={"name": "qa-2", "role": "qa"}), 409, "token-exists"
    )
    assert_problem(
        api.post("/v1/tokens", "admin", json={"name": "x", "role": "root"}), 422, "bad-role"
    )


def test_metrics(api: Api) -> None:
    api.batch()
    _, key = issue(api, "dev-m")
    ch = api.post("/v1/devices/dev-m/challenge", "board").json()["nonce"]
    sig = base64.b64encode(sign(key, proof_message("dev-m", base64.b64decode(ch)))).decode()
    api.post("/v1/devices/dev-m/proof", "board", json={"nonce": ch, "signature": sig})
    api.post("/v1/certificates", "board", json={"batch": "B1", "device_id": "x", "csr": "junk"})
    text = api.get("/metrics", "operator").text  # board counts are for reader roles
    # HTTP requests answered by this service; certificates issued come from the ledger
    # (every channel), per batch.
    assert 'station_http_certificate_requests_total{outcome="issued"} 1.0' in text
    assert 'station_certificates_issued_total{batch="B1"} 1.0' in text
    assert 'station_issue_failures_total{code="malformed-csr"} 1.0' in text
    assert "station_issue_duration_seconds_count 2.0" in text
    assert "station_hsm_sign_duration_seconds_count 1.0" in text
    assert 'station_boards{batch="B1",state="verified"} 1.0' in text
    assert "station_ledger_up 1.0" in text


def test_line_status_and_dashboard_page(api: Api) -> None:
    api.batch("B1", planned=4)
    issue(api, "dev-l")
    api.post("/v1/certificates", "board", json={"batch": "B1", "device_id": "x", "csr": "junk"})
    status = {
        "updated": "2026-11-29T11:00:00.000+00:00",
        "batch": "B1",
        "ports": [
            {
                "port": "/dev/ttyUSB0",
                "device_id": "artik-7",
                "step": "prove",
                "since": "2026-11-29T10:59:58.000+00:00",
                "last_error": None,
            }
        ],
        "counts": {"verified": 0, "failed": 0, "skipped": 0, "in_progress": 1},
        "recent_failures": [],
        "issued_per_min": 6.0,
    }
    (api.settings.data_dir / "line-status.json").write_text(json.dumps(status))
    data = api.get("/v1/line/status", "qa").json()
    (b1,) = data["batches"]
    assert (b1["name"], b1["planned_count"], b1["device_count"], b1["verified"]) == ("B1", 4, 1, 0)
    assert data["ports"][0]["port"] == "/dev/ttyUSB0" and data["ports"][0]["step"] == "prove"
    assert data["ports"][0]["batch"] == "B1"
    assert data["recent_refusals"][0]["code"] == "malformed-csr"
    assert data["issue_rate_per_min"] >= 7.0

    page = api.client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert api.client.get("/static/app.js").status_code == 200
