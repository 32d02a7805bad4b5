"""EST serverkeygen (RFC 7030 section 4.4) over HTTPS with curl and openssl.

For boards that cannot make keys, in batches whose keys the station makes
(``see-rsa``): the station generates RSA-2048 in software, has it certified
through the one issuance path and answers ``multipart/mixed``: the key as
``application/pkcs8``, the certificate as ``application/pkcs7-mime;
smime-type=certs-only``, both base64. The multipart answer is split with the
standard library's MIME parser (what a client's MIME library does), each part
decoded and read by the openssl CLI; the key must match the certificate. The
key never reaches the ledger or the server's log.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from station.ca import CertificateAuthority, DeviceProfile
from station.ledger import Ledger
from station.ledger.schema import audit_log, certificates
from station.settings import Settings
from station.whitelist import serial_hex
from tests.fixtures.hsm import settings_for
from tests.serving import Served, serve

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


@dataclass
class Station:
    served: Served
    settings: Settings
    token: str
    work: Path
    keys: list[bytes]  # the base64 keys handed out, looked for in the server's log at the end

    @property
    def base(self) -> str:
        return f"{self.served.url}/.well-known/est"

    def curl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        assert self.served.ca_file is not None
        return subprocess.run(
            ["curl", "-sS", "--max-time", "60", "--cacert", str(self.served.ca_file), *args],
            capture_output=True, timeout=90, cwd=self.work,
        )  # fmt: skip

    def count(self, table: object, *where: object) -> int:
        with Ledger.from_settings(self.settings) as led, led.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar())


@pytest.fixture(scope="module")
def station(ca_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Station]:
    root = tmp_path_factory.mktemp("skg")
    settings = settings_for(ca_home, root / "data")
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "S", product="p", planned_count=10, key_mode="see-rsa", subject_template=TEMPLATE
        )
        ledger.create_batch(
            "E", product="p", planned_count=10, key_mode="board-ecc", subject_template=TEMPLATE
        )
        # see-rsa too, but not opted in: serial line only.
        ledger.create_batch(
            "LINE", product="p", planned_count=10, key_mode="see-rsa", subject_template=TEMPLATE
        )
        token = ledger.create_token("skg-board", "board")
    work = root / "work"
    work.mkdir()
    keys: list[bytes] = []
    with serve(
        settings, STATION_EST_DEFAULT_BATCH="S", STATION_EST_SERVERKEYGEN_BATCHES="E, S"
    ) as served:
        yield Station(served, settings, token, work, keys)
    # The server's log (read once it stopped) holds nothing of any key it handed out.
    log = "".join(served.log)
    assert keys and not any(k[:64].decode() in log for k in keys)


def openssl(*args: str, cwd: Path, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *args], capture_output=True, cwd=cwd, input=stdin, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def template(s: Station, name: str, device_id: str) -> None:
    """A CSR made with a throw-away key: serverkeygen takes only its subject."""
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}-throwaway.key", "-subj", f"/O=company/OU=team/CN={device_id}/C=US",
        "-outform", "DER", "-out", f"{name}.der", cwd=s.work,
    )  # fmt: skip
    openssl("base64", "-in", f"{name}.der", "-out", f"{name}.b64", cwd=s.work)


def serverkeygen(s: Station, name: str, path: str = "/serverkeygen") -> tuple[int, str, bytes]:
    """(status, content type, body) of a serverkeygen POST with the board token."""
    done = s.curl(
        "-D", f"{name}.headers", "-o", f"{name}.out", "-u", f"board:{s.token}",
        "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{name}.b64", s.base + path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The last header block (curl writes an interim 100 Continue's too, if any).
    block = (s.work / f"{name}.headers").read_bytes().decode().strip().split("\r\n\r\n")[-1]
    head = block.split("\r\n")
    status = int(head[0].split()[1])
    ctype = next(h.split(":", 1)[1].strip() for h in head if h.lower().startswith("content-type:"))
    return status, ctype, (s.work / f"{name}.out").read_bytes()


def test_serverkeygen_returns_a_key_that_matches_its_certificate(station: Station) -> None:
    s = station
    template(s, "k1", "skg-1")
    certs_before = s.count(certificates)
    status, ctype, body = serverkeygen(s, "k1", "/S/serverkeygen")
    assert status == 200, body
    assert ctype.startswith("multipart/mixed; boundary=")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + body
    )
    assert message.is_multipart()
    key_part, cert_part = message.iter_parts()  # type: ignore[attr-defined]
    assert key_part.get_content_type() == "application/pkcs8"
    assert cert_part.get_content_type() == "application/pkcs7-mime"
    assert cert_part.get_param("smime-type") == "certs-only"
    for part in (key_part, cert_part):
        assert part["Content-Transfer-Encoding"] == "base64"
    key_der = openssl("base64", "-d", cwd=s.work, stdin=str(key_part.get_payload()).encode())
    (s.work / "k1.key").write_bytes(
        openssl("pkey", "-inform", "DER", "-out", "-", cwd=s.work, stdin=key_der)
    )
    p7 = openssl("base64", "-d", cwd=s.work, stdin=str(cert_part.get_payload()).encode())
    (s.work / "k1.pem").write_bytes(
        openssl("pkcs7", "-inform", "DER", "-print_certs", cwd=s.work, stdin=p7)
    )
    # The key is the certificate's (openssl compares the public halves), RSA-2048,
    # not the template's throw-away key.
    from_key = openssl("pkey", "-in", "k1.key", "-pubout", cwd=s.work)
    from_cert = openssl("x509", "-in", "k1.pem", "-pubkey", "-noout", cwd=s.work)
    assert from_key == from_cert
    throwaway = openssl("pkey", "-in", "k1-throwaway.key", "-pubout", cwd=s.work)
    assert from_key != throwaway
    assert b"Private-Key: (2048 bit" in openssl(
        "pkey", "-in", "k1.key", "-text", "-noout", cwd=s.work
    )
    key = serialization.load_pem_private_key((s.work / "k1.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    openssl("verify", "-CAfile", str(s.settings.ca_cert_path), "k1.pem", cwd=s.work)

    cert = x509.load_pem_x509_certificate((s.work / "k1.pem").read_bytes())
    serial = serial_hex(cert.serial_number)
    assert s.count(certificates) == certs_before + 1
    with Ledger.from_settings(s.settings) as ledger:
        record = ledger.certificate(serial)
        assert record.device_id == "skg-1" and record.batch == "S"
        assert ledger.get_device("skg-1").state == "issued"
    assert s.count(audit_log, audit_log.c.action == "est.serverkeygen") == 1

    # The station kept nothing of the key: not in the ledger, not in its log.
    ledger_bytes = b"".join(p.read_bytes() for p in Path(s.settings.data_dir).glob("ledger*"))
    assert ledger_bytes and key_der not in ledger_bytes
    assert base64.b64encode(key_der)[:64] not in ledger_bytes
    s.keys.append(str(key_part.get_payload()).encode())

    # The board uses its new key and certificate: verified, as after simpleenroll.
    done = s.curl("--cert", "k1.pem", "--key", "k1.key", s.base + "/S/cacerts")
    assert done.returncode == 0, done.stderr
    with Ledger.from_settings(s.settings) as ledger:
        assert ledger.get_device("skg-1").state == "verified"


def test_the_default_batch_and_a_second_request(station: Station) -> None:
    """Unlabelled: the default batch. Asking again for the same board is a second key
    for a board that has one: refused like any enrolment, nothing issued."""
    s = station
    template(s, "k2", "skg-2")
    status, _, body = serverkeygen(s, "k2")
    assert status == 200, body
    certs_before = s.count(certificates)
    status, ctype, body = serverkeygen(s, "k2")
    assert status == 409 and ctype.startswith("text/plain"), body
    assert body.startswith(b"already-provisioned: ")
    assert s.count(certificates) == certs_before


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("board-ecc-batch", 403, "est-key-mode"),
        ("not-enabled", 403, "est-serverkeygen-not-enabled"),
        ("no-auth", 401, "unauthorized"),
        ("no-cn", 422, "est-no-device-id"),
        ("wrong-subject", 422, "subject-mismatch"),
        ("not-base64", 400, "est-malformed"),
    ],
)
def test_serverkeygen_refusals(station: Station, case: str, status: int, code: str) -> None:
    s = station
    name = f"bad-{case}"
    subject = f"/O=company/OU=team/CN=skg-{case}/C=US"
    if case == "no-cn":
        subject = "/O=company"
    elif case == "wrong-subject":
        subject = f"/O=other/OU=team/CN=skg-{case}/C=US"
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-subj", subject, "-outform", "DER", "-out", f"{name}.der",
        cwd=s.work,
    )  # fmt: skip
    openssl("base64", "-in", f"{name}.der", "-out", f"{name}.b64", cwd=s.work)
    if case == "not-base64":
        (s.work / f"{name}.b64").write_bytes(b"{not base64}")
    path = {"board-ecc-batch": "/E", "not-enabled": "/LINE"}.get(case, "/S") + "/serverkeygen"
    auth = [] if case == "no-auth" else ["-u", f"board:{s.token}"]
    certs_before = s.count(certificates)
    refused_before = s.count(audit_log, audit_log.c.action == "est.refused")
    done = s.curl(
        "-w", "\n%{http_code}", *auth, "-H", "Content-Type: application/pkcs10",
        "--data-binary", f"@{name}.b64", s.base + path,
    )  # fmt: skip
    text, _, got = done.stdout.decode().rpartition("\n")
    assert int(got) == status and text.startswith(f"{code}: "), text
    assert s.count(certificates) == certs_before
    assert s.count(audit_log, audit_log.c.action == "est.refused") == refused_before + 1


def test_serverkeygen_needs_tls(station_settings: Settings) -> None:
    """Over plain HTTP a private key would cross the network in the clear: refused
    before anything is made (in process: TestClient speaks plain HTTP)."""
    with Ledger.from_settings(station_settings) as ledger:
        ledger.create_batch(
            "S", product="p", planned_count=3, key_mode="see-rsa", subject_template=TEMPLATE
        )
        token = ledger.create_token("plain-board", "board")
    with TestClient(create_app(station_settings)) as client:
        from tests.csrs import csr_der, device_name, make_csr

        csr, _ = make_csr(device_name("skg-plain"))
        r = client.post(
            "/.well-known/est/S/serverkeygen",
            content=base64.b64encode(csr_der(csr)),
            headers={"Content-Type": "application/pkcs10", "Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 403 and r.text.startswith("est-serverkeygen-needs-tls: "), r.text
        assert client.app.state.station.ledger.certificates("skg-plain") == []  # type: ignore[attr-defined]


def test_serverkeygen_is_off_unless_the_operator_names_the_batch(
    ca_home: Path, tmp_path: Path
) -> None:
    """A see-rsa batch's keys went only into Secure Elements over the serial line:
    handing one out over the network is the operator's choice per batch
    (STATION_EST_SERVERKEYGEN_BATCHES, empty by default). Refused before any key is
    made, audited, nothing issued; the same batch named in the setting issues."""
    from tests.csrs import csr_der, device_name, make_csr

    csr, _ = make_csr(device_name("skg-off"))
    request = {
        "content": base64.b64encode(csr_der(csr)),
        "headers": {"Content-Type": "application/pkcs10"},
    }
    data = tmp_path / "data"
    for enabled, status in ((None, 403), ("S", 200)):
        overrides = {} if enabled is None else {"est_serverkeygen_batches": enabled}
        settings = settings_for(ca_home, data, **overrides)
        if enabled is None:
            assert settings.est_serverkeygen_batches == frozenset()
            with Ledger.from_settings(settings) as ledger:
                ledger.create_batch(
                    "S", product="p", planned_count=3, key_mode="see-rsa", subject_template=TEMPLATE
                )
                token = ledger.create_token("off-board", "board")
        request["headers"]["Authorization"] = f"Bearer {token}"  # type: ignore[index]
        app = create_app(settings)
        with TestClient(app, base_url="https://testserver") as client:
            r = client.post("/.well-known/est/S/serverkeygen", **request)  # type: ignore[arg-type]
            ledger = app.state.station.ledger
            if status == 403:
                assert r.status_code == 403, r.text
                assert r.text.startswith("est-serverkeygen-not-enabled: "), r.text
                assert "STATION_EST_SERVERKEYGEN_BATCHES" in r.text
                assert ledger.certificates("skg-off") == []
                with ledger.engine.connect() as conn:
                    (detail,) = conn.execute(
                        select(audit_log.c.detail).where(audit_log.c.action == "est.refused")
                    ).scalars()
                assert json.loads(detail)["code"] == "est-serverkeygen-not-enabled"
            else:
                assert r.status_code == 200, r.text
                assert [c.state for c in ledger.certificates("skg-off")] == ["issued"]


def test_the_cheap_refusals_come_before_the_key_is_made(
    ca_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A board that already has its certificate, a closed or full batch, a subject that
    does not fit: refused with the issuer's codes without an RSA-2048 generation each
    (make_key is counted, and still makes the real key, when it runs)."""
    from station.enroll import serverkeygen as skg
    from tests.csrs import csr_der, device_name, make_csr, name

    made: list[x509.Name] = []
    real_make_key = skg.make_key

    def counted(subject: x509.Name) -> skg.MadeKey:
        made.append(subject)
        return real_make_key(subject)

    monkeypatch.setattr(skg, "make_key", counted)
    settings = settings_for(ca_home, tmp_path / "data", est_serverkeygen_batches="S,C,F")
    with Ledger.from_settings(settings) as ledger:
        for batch, planned in (("S", 5), ("C", 5), ("F", 1)):
            ledger.create_batch(
                batch, product="p", planned_count=planned, key_mode="see-rsa",
                subject_template=TEMPLATE,
            )  # fmt: skip
        ledger.close_batch("C")
        token = ledger.create_token("cheap-board", "board")

    def ask(client: TestClient, batch: str, subject: x509.Name) -> tuple[int, str]:
        csr, _ = make_csr(subject)
        r = client.post(
            f"/.well-known/est/{batch}/serverkeygen",
            content=base64.b64encode(csr_der(csr)),
            headers={"Content-Type": "application/pkcs10", "Authorization": f"Bearer {token}"},
        )
        return r.status_code, r.text.split(":")[0]

    with TestClient(create_app(settings), base_url="https://testserver") as client:
        assert ask(client, "S", device_name("cheap-1"))[0] == 200
        assert ask(client, "F", device_name("cheap-f1"))[0] == 200
        assert len(made) == 2
        assert ask(client, "S", device_name("cheap-1")) == (409, "already-provisioned")
        assert ask(client, "C", device_name("cheap-2")) == (409, "batch-closed")
        assert ask(client, "F", device_name("cheap-f2")) == (409, "batch-full")
        other = name(O="other", OU="team", CN="cheap-3", C="US")
        assert ask(client, "S", other) == (422, "subject-mismatch")
        assert len(made) == 2  # no key made for any refusal


def test_the_answer_is_built_in_one_buffer_from_views_of_the_key(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer is allocated once at its final size (growing it with += would leave
    the superseded buffers, with the key's base64 in them, unwiped), and the key is
    read through views, never sliced into copies; wiping it leaves no byte of it."""
    from station.enroll import est
    from station.enroll import serverkeygen as skg

    made = skg.make_key(x509.Name.from_rfc4514_string("CN=skg-wipe,O=company"))
    cert = ca.issue(
        made.csr, subject=made.csr.subject, serial=x509.random_serial_number(),
        profile=DeviceProfile(days=1),
    )  # fmt: skip
    key_der = bytes(made.pkcs8)
    fed: list[type] = []
    b64encode = base64.b64encode

    def watched(data: bytes | bytearray | memoryview) -> bytes:
        fed.append(type(data))
        return b64encode(data)

    monkeypatch.setattr(est.base64, "b64encode", watched)
    body, ctype = est.serverkeygen_body(made.pkcs8, cert)
    monkeypatch.undo()

    assert sys.getsizeof(body) == sys.getsizeof(bytearray(len(body)))
    assert fed and set(fed) == {memoryview}
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + bytes(body)
    )
    key_part, cert_part = message.iter_parts()  # type: ignore[attr-defined]
    assert base64.b64decode(str(key_part.get_payload())) == key_der
    lines = str(key_part.get_payload()).rstrip("\r\n").split("\r\n")
    assert all(len(line) == 64 for line in lines[:-1]) and 0 < len(lines[-1]) <= 64
    assert cert_part.get_content_type() == "application/pkcs7-mime"
    skg.wipe(made.pkcs8, body)
    assert not any(made.pkcs8) and not any(body)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 47, 48, 49, 96, 1217, 1218, 1219])
def test_the_key_lines_fill_their_buffer_exactly(n: int) -> None:
    from station.enroll.est import _b64_into, _b64_size

    data = bytes(range(256)) * 5
    data = data[:n]
    out = bytearray(_b64_size(n))
    assert _b64_into(memoryview(out), 0, bytearray(data)) == len(out)
    assert base64.b64decode(bytes(out)) == data
    assert all(len(line) <= 64 for line in bytes(out).split(b"\r\n"))


class _PowerCut(Exception):
    """The station dies between the token's signature and the ledger's commit."""


def test_a_crash_after_the_signature_lets_the_board_ask_again(
    ca_home: Path, tmp_path: Path, ledger_url: str
) -> None:
    """The key lived only in the dead process's memory: recovery must not certify it
    (nobody holds it) but abandon the intent, and the board's retry gets a new key.
    On a SQLite file and on PostgreSQL (HTTPS as the app sees it: TestClient's base URL)."""
    from tests.csrs import csr_der, device_name, make_csr

    settings = settings_for(
        ca_home, tmp_path / "data", database_url=ledger_url, est_serverkeygen_batches="S"
    )
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "S", product="p", planned_count=1, key_mode="see-rsa", subject_template=TEMPLATE
        )
        token = ledger.create_token("crash-board", "board")
    device = "skg-crash"
    csr, _ = make_csr(device_name(device))
    request = {
        "content": base64.b64encode(csr_der(csr)),
        "headers": {"Content-Type": "application/pkcs10", "Authorization": f"Bearer {token}"},
    }

    def power_cut(_cert: x509.Certificate) -> None:
        raise _PowerCut

    app = create_app(settings)
    with TestClient(app, base_url="https://testserver") as client:
        ledger = app.state.station.ledger
        ledger.after_sign = power_cut
        with pytest.raises(_PowerCut):
            client.post("/.well-known/est/S/serverkeygen", **request)
        ledger.after_sign = None
        (intent,) = ledger.certificates(device)
        assert intent.state == "intent"

        report = ledger.recover(app.state.station.issuing_ca())  # as at the next start

        assert report.resigned == ()
        assert report.failed == ((intent.serial, "serverkeygen-key-lost"),)
        lost = ledger.certificate(intent.serial)
        assert lost.state == "failed" and lost.pem is None
        assert ledger.get_device(device).state == "failed"
        # The board asks again (the batch plans one board: its retry takes no new place).
        r = client.post("/.well-known/est/S/serverkeygen", **request)
        assert r.status_code == 200, r.text
        serial = r.headers["X-Certificate-Serial"]
        assert serial != intent.serial
        assert ledger.certificate(serial).state == "issued"
        assert ledger.get_device(device).state == "issued"
        assert [c.state for c in ledger.certificates(device)] == ["failed", "issued"]
        assert ledger.audit_verify() is None
