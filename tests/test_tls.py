"""HTTPS for `station serve`, checked with real TLS clients (curl, Python's ssl, openssl)."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from station.ca import open_ca
from station.ledger import Ledger
from station.settings import Settings
from station.tls import is_loopback, plain_http_warning
from tests.csrs import csr_pem, device_name, make_csr
from tests.serving import run_cli, serve


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=60
    )


def device_pair(settings: Settings, tmp: Path, device_id: str = "tls-dev-1") -> tuple[Path, Path]:
    """A device certificate from the station's CA and its key, as files."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr, _ = make_csr(device_name(device_id), key)
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "T",
            product="p",
            planned_count=5,
            key_mode="board-ecc",
            subject_template="/O=company/OU=team/CN={device_id}/C=US",
        )
        result = ledger.issue("T", device_id, csr_pem(csr), open_ca(settings))
    cert = tmp / f"{device_id}.pem"
    cert.write_bytes(result.certificate.public_bytes(serialization.Encoding.PEM))
    keyf = tmp / f"{device_id}.key"
    keyf.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, keyf


def test_tls_init_makes_a_server_pair_signed_by_a_throwaway_ca(station_settings: Settings) -> None:
    done = run_cli(station_settings, "tls", "init", "--host", "station.local", "--host", "10.0.0.7")
    assert done.returncode == 0, done.stderr
    d = station_settings.tls_dir
    assert stat.S_IMODE(os.stat(d / "server.key").st_mode) == 0o600
    chain = x509.load_pem_x509_certificates((d / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["station.local"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    leaf.verify_directly_issued_by(ca)
    # Not the station's CA: what that CA signs, AWS IoT takes for a device.
    station_ca = x509.load_pem_x509_certificate(station_settings.ca_cert_path.read_bytes())
    assert leaf.issuer != station_ca.subject
    assert not list(d.glob("*ca*.key"))  # the throw-away CA's key is never written
    bad = run_cli(station_settings, "tls", "init", "--host", "bad host")
    assert bad.returncode == 1 and "error [bad-host]" in bad.stderr


def test_https_checks_chain_and_host_name(station_settings: Settings) -> None:
    with serve(station_settings) as s:
        assert s.ca_file is not None
        ok = curl("--cacert", str(s.ca_file), f"{s.url}/healthz")
        assert ok.returncode == 0, ok.stderr
        assert '"status"' in ok.stdout
        # The chain must lead to the trusted CA: without it curl refuses (60).
        untrusted = curl(f"{s.url}/healthz")
        assert untrusted.returncode == 60, untrusted.stderr
        # The host name must be in the certificate.
        wrong_name = curl(
            "--cacert",
            str(s.ca_file),
            "--resolve",
            f"elsewhere.test:{s.port}:127.0.0.1",
            f"https://elsewhere.test:{s.port}/healthz",
        )
        assert wrong_name.returncode == 60 and "elsewhere.test" in wrong_name.stderr
        # Python's ssl with its defaults (CERT_REQUIRED, check_hostname).
        ctx = ssl.create_default_context(cafile=str(s.ca_file))
        with (
            socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert tls.recv(100).startswith(b"HTTP/1.1 200")
        # Plain HTTP on the TLS port gets nothing.
        plain = curl(f"http://127.0.0.1:{s.port}/healthz")
        assert plain.returncode != 0


def test_client_certificates_required(station_settings: Settings, tmp_path: Path) -> None:
    cert, key = device_pair(station_settings, tmp_path)
    # A key and self-signed certificate the station's CA never saw.
    stranger_key = tmp_path / "s.key"
    stranger = tmp_path / "s.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(stranger_key),
            "-out",
            str(stranger),
            "-subj",
            "/CN=s",
            "-days",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    with serve(station_settings, client_cert=(cert, key), STATION_TLS_CLIENT_CERTS="required") as s:
        assert s.ca_file is not None
        none = curl("--cacert", str(s.ca_file), f"{s.url}/healthz")
        assert none.returncode != 0
        foreign = curl(
            "--cacert",
            str(s.ca_file),
            "--cert",
            str(stranger),
            "--key",
            str(stranger_key),
            f"{s.url}/healthz",
        )
        assert foreign.returncode != 0
        ok = curl(
            "--cacert", str(s.ca_file), "--cert", str(cert), "--key", str(key), f"{s.url}/healthz"
        )
        assert ok.returncode == 0, ok.stderr


def test_plain_http_warning() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("station.local")
    assert plain_http_warning("127.0.0.1") is None
    warning = plain_http_warning("0.0.0.0")
    assert warning is not None and "plain HTTP" in warning and "--tls-cert" in warning


def test_serve_warns_about_plain_http_on_the_network(station_settings: Settings) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: the bind fails after the warning.
    done = run_cli(station_settings, "serve", "--host", "192.0.2.1", "--port", "1")
    assert "WARNING: serving plain HTTP on 192.0.2.1" in done.stderr
    assert done.returncode != 0


@pytest.mark.parametrize(
    ("env", "code"),
    [
        # A certificate without its key ("CA" stands for a file that exists).
        ({"STATION_TLS_CERT": "CA"}, "tls-incomplete"),
        # A path naming no file is a bad setting for every command (issue 20's rule).
        ({"STATION_TLS_CERT": "/nonexistent.pem", "STATION_TLS_KEY": "/x.key"}, "bad-setting"),
    ],
)
def test_serve_refuses_incomplete_tls(
    station_settings: Settings, env: dict[str, str], code: str
) -> None:
    env = {k: str(station_settings.ca_cert_path) if v == "CA" else v for k, v in env.items()}
    done = run_cli(station_settings, "serve", "--port", "1", **env)
    assert done.returncode == 3, done.stderr
    assert f"error [{code}]" in done.stderr
