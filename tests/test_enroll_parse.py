"""EST and CMP parse a board's PKCS#10 once: the route's checks and the issuer share it.

In process (real SoftHSM token and ledger), counting the calls of cryptography's
``x509.load_der_x509_csr`` (a spy: each call goes through to the real parser)
while one request is served. EST's re-enrolment needs the device's certificate
as the TLS client certificate; here a small ASGI wrapper puts it in the request
scope where the station's TLS server puts it (api/tls.py), since TestClient has
no TLS. tests/test_est.py does the same over real HTTPS with curl and `pki --est`.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from pyasn1.codec.der import decoder as der_decoder
from pyasn1_modules import rfc4210

from api.app import create_app
from station.enroll import cmp
from station.ledger import Ledger
from station.settings import Settings
from tests.csrs import device_name, make_csr

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every DER CSR parsed, in order."""
    seen: list[bytes] = []
    real = x509.load_der_x509_csr

    def load(data: bytes, *args: Any) -> x509.CertificateSigningRequest:
        seen.append(bytes(data))
        return real(data, *args)

    monkeypatch.setattr(x509, "load_der_x509_csr", load)
    return seen


class _ClientCertificate:
    """What the TLS server does after a handshake with a client certificate."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pem: str | None = None

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and self.pem is not None:
            scope = {**scope, "extensions": {"tls": {"client_cert_chain": [self.pem]}}}
        await self.app(scope, receive, send)


@pytest.fixture
def station(
    station_settings: Settings, tmp_path: Path
) -> Iterator[tuple[TestClient, _ClientCertificate, str, Path]]:
    with Ledger.from_settings(station_settings) as led:
        led.create_batch(
            "P", product="p", planned_count=10, key_mode="board-ecc", subject_template=TEMPLATE
        )
        token = led.create_token("parse-board", "board")
    secrets = tmp_path / "cmp-secrets"
    secrets.write_text(f"parse-board {token}\n")
    secrets.chmod(0o600)
    app = create_app(station_settings.model_copy(update={"cmp_secrets": secrets}))
    tls = _ClientCertificate(app)
    with TestClient(tls) as client:  # type: ignore[arg-type]
        yield client, tls, token, tmp_path


def _b64(csr: x509.CertificateSigningRequest) -> bytes:
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER))


def test_est_parses_the_csr_once(
    station: tuple[TestClient, _ClientCertificate, str, Path], parses: list[bytes]
) -> None:
    client, tls, token, _ = station
    key = ec.generate_private_key(ec.SECP256R1())
    csr, _ = make_csr(device_name("parse-est-1"), key)
    headers = {"Content-Type": "application/pkcs10", "Authorization": f"Bearer {token}"}
    parses.clear()
    r = client.post("/.well-known/est/P/simpleenroll", content=_b64(csr), headers=headers)
    assert r.status_code == 200, r.text
    assert parses == [csr.public_bytes(serialization.Encoding.DER)], f"parsed {len(parses)} times"

    [record] = tls.app.state.station.ledger.certificates("parse-est-1")
    tls.pem = record.pem
    renewal, _ = make_csr(device_name("parse-est-1"))
    parses.clear()
    r = client.post(
        "/.well-known/est/P/simplereenroll",
        content=_b64(renewal),
        headers={"Content-Type": "application/pkcs10"},
    )
    assert r.status_code == 200, r.text
    assert parses == [renewal.public_bytes(serialization.Encoding.DER)], len(parses)


def test_cmp_p10cr_parses_the_csr_once(
    station: tuple[TestClient, _ClientCertificate, str, Path], parses: list[bytes]
) -> None:
    client, _, token, work = station
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", "k.pem", "-subj", "/O=company/OU=team/CN=parse-cmp-1/C=US",
         "-outform", "DER", "-out", "r.der"],
        check=True, capture_output=True, cwd=work,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "cmp", "-cmd", "p10cr", "-server", "127.0.0.1:1", "-path", "x",
         "-ref", "parse-board", "-secret", f"pass:{token}", "-csr", "r.der",
         "-reqout", "p10cr.der"],
        capture_output=True, cwd=work, timeout=60,
    )  # fmt: skip
    parses.clear()
    r = client.post(
        "/.well-known/cmp/p/P/pkcs10",
        content=(work / "p10cr.der").read_bytes(),
        headers={"Content-Type": cmp.CONTENT_TYPE},
    )
    msg, _ = der_decoder.decode(r.content, asn1Spec=rfc4210.PKIMessage())
    assert msg["body"].getName() == "cp", r.content
    assert parses == [(work / "r.der").read_bytes()], f"parsed {len(parses)} times"
