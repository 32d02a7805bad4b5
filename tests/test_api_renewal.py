"""Field renewal over the JSON API: `renews` on POST /v1/certificates, authenticated by the
device's current certificate as the TLS client certificate (as EST's simplereenroll)."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_hooks.protocol import proof_message
from station.ledger import Ledger
from station.settings import Settings
from tests.fixtures.hsm import settings_for
from tests.serving import Served, serve
from tests.test_api_helpers import TEMPLATE, new_csr


@dataclass
class Api:
    served: Served
    settings: Settings
    token: str
    work: Path

    def client(self, cert: tuple[Path, Path] | None = None) -> httpx.Client:
        assert self.served.ca_file is not None
        ctx = ssl.create_default_context(cafile=str(self.served.ca_file))
        if cert is not None:
            ctx.load_cert_chain(*cert)
        return httpx.Client(
            base_url=self.served.url,
            verify=ctx,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )

    def enrol(self, device_id: str) -> tuple[tuple[Path, Path], str]:
        """A verified device: certificate and key files, and its serial."""
        pem, key = new_csr(device_id)
        with self.client() as http:
            r = http.post(
                "/v1/certificates", json={"batch": "B", "device_id": device_id, "csr": pem}
            )
            assert r.status_code == 201, r.text
            serial = r.json()["serial"]
            nonce = http.post(f"/v1/devices/{device_id}/challenge").json()["nonce"]
            message = proof_message(device_id, base64.b64decode(nonce))
            sig = key.sign(message, ec.ECDSA(hashes.SHA256()))
            r = http.post(
                f"/v1/devices/{device_id}/proof",
                json={"nonce": nonce, "signature": base64.b64encode(sig).decode()},
            )
            assert r.status_code == 200 and r.json()["state"] == "verified", r.text
        cert_path = self.work / f"{device_id}.pem"
        key_path = self.work / f"{device_id}.key"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        with Ledger.from_settings(self.settings) as ledger:
            cert_path.write_text(ledger.certificate(serial).pem or "")
        return (cert_path, key_path), serial


@pytest.fixture(scope="module")
def api(ca_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("renewal")
    settings = settings_for(ca_home, root / "data")
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "B", product="p", planned_count=50, key_mode="board-ecc", subject_template=TEMPLATE
        )
        token = ledger.create_token("renewal-board", "board")
    work = root / "work"
    work.mkdir()
    with serve(settings) as served:
        yield Api(served, settings, token, work)


def test_renewal_over_the_json_api(api: Api) -> None:
    tls, old = api.enrol("jr-1")
    pem, _ = new_csr("jr-1")
    with api.client(tls) as http:
        r = http.post(
            "/v1/certificates",
            json={"batch": "B", "device_id": "jr-1", "csr": pem, "renews": old},
        )
    assert r.status_code == 201, r.text
    new = r.json()["serial"]
    with Ledger.from_settings(api.settings) as ledger:
        assert ledger.certificate(old).state == "superseded"
        device = ledger.get_device("jr-1")
        assert device.serial == new and device.state == "verified"
        listed = {e.serial for e in ledger.whitelist()}
        assert new in listed and old not in listed


def test_renewal_needs_the_current_certificate_over_tls(api: Api) -> None:
    tls, old = api.enrol("jr-2")
    other_tls, _ = api.enrol("jr-3")
    pem, _ = new_csr("jr-2")
    body = {"batch": "B", "device_id": "jr-2", "csr": pem, "renews": old}
    with api.client() as http:  # no client certificate
        r = http.post("/v1/certificates", json=body)
    assert r.status_code == 401 and r.json()["code"] == "renewal-needs-certificate", r.text
    with api.client(other_tls) as http:  # another board's certificate
        r = http.post("/v1/certificates", json=body)
    assert r.status_code == 403 and r.json()["code"] == "renewal-certificate-mismatch", r.text
    with api.client(tls) as http:  # a serial that is not hex
        r = http.post("/v1/certificates", json={**body, "renews": "zz"})
    assert r.status_code == 422, r.text
    with Ledger.from_settings(api.settings) as ledger:
        assert ledger.certificate(old).state == "issued"
        assert len(ledger.certificates("jr-2")) == 1
    assert isinstance(x509.load_pem_x509_certificate(tls[0].read_bytes()), x509.Certificate)


def test_a_renewal_naming_another_batch_is_refused(api: Api) -> None:
    """A board token with the board's own certificate names another (closed) batch in
    its renewal: 403 renewal-other-batch, the board stays in its batch, nothing issued."""
    tls, old = api.enrol("jr-4")
    with Ledger.from_settings(api.settings) as ledger:
        ledger.create_batch(
            "B-closed", product="p", planned_count=1, key_mode="board-ecc",
            subject_template=TEMPLATE,
        )  # fmt: skip
        ledger.close_batch("B-closed")
    pem, _ = new_csr("jr-4")
    with api.client(tls) as http:
        r = http.post(
            "/v1/certificates",
            json={"batch": "B-closed", "device_id": "jr-4", "csr": pem, "renews": old},
        )
    assert r.status_code == 403 and r.json()["code"] == "renewal-other-batch", r.text
    with Ledger.from_settings(api.settings) as ledger:
        device = ledger.get_device("jr-4")
        assert device.batch == "B" and device.state == "verified" and device.serial == old
        assert [c.state for c in ledger.certificates("jr-4")] == ["issued"]
