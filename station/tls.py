"""TLS for `station serve`: what the server presents, whom it asks, and a development key.

The server key and certificate are ordinary PEM files (``STATION_TLS_CERT``,
``STATION_TLS_KEY``): in a factory they come from the company PKI. Clients may
present a certificate issued by the station's own CA (its device certificates):
EST re-enrolment authenticates a board by it. The TLS layer checks such a
certificate's chain; the channel then looks it up in the ledger.

``station tls init`` makes a development server certificate. It is signed by a
throw-away CA made for the purpose, not by the station's CA in the token: the
station CA's certificates are device identities (AWS IoT registers whatever it
signs through JITR; only the whitelist keeps a stray one out), and boards would
have to trust their own device CA to check the server. The
throw-away CA's key lives only in memory while it signs and is then dropped, so
there is no second CA key to guard; its certificate (``tls/ca.pem``) is what
clients are given to check the server (``curl --cacert``, ``pki --est --cacert``,
``openssl cmp -tls_trusted``). Running the command again replaces both.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from station.ca import key_usage
from station.errors import ConfigurationError, PolicyError
from station.settings import Settings

DEV_DAYS = 825  # the longest validity clients such as macOS accept for a server certificate


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None  # chain client certificates must verify to; None: not asked
    client_certs: str  # off, optional, required

    @property
    def cert_reqs(self) -> int:
        if self.client_ca is None or self.client_certs == "off":
            return ssl.CERT_NONE
        return ssl.CERT_REQUIRED if self.client_certs == "required" else ssl.CERT_OPTIONAL


def tls_files(
    settings: Settings, cert: Path | None = None, key: Path | None = None
) -> TlsFiles | None:
    """The TLS configuration to serve with, or None for plain HTTP.

    Codes: tls-incomplete (a certificate without a key or the other way round),
    tls-file-missing.
    """
    cert = cert or settings.tls_cert
    key = key or settings.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigurationError(
            "TLS needs both a certificate and its key (--tls-cert and --tls-key, or "
            "STATION_TLS_CERT and STATION_TLS_KEY)",
            code="tls-incomplete",
        )
    for path in (cert, key):
        if not path.is_file():
            raise ConfigurationError(f"no TLS file at {path}", code="tls-file-missing")
    try:
        # Load once here so a bad pair is one clear line, not a worker's traceback.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigurationError(
            f"the TLS certificate and key do not load together: {exc}", code="tls-bad-pair"
        ) from exc
    client_ca = settings.ca_cert_path if settings.ca_cert_path.is_file() else None
    return TlsFiles(cert, key, client_ca, settings.tls_client_certs)


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def plain_http_warning(host: str) -> str | None:
    """The warning for serving plain HTTP on ``host``, or None when only loopback hears it."""
    if is_loopback(host):
        return None
    return (
        f"WARNING: serving plain HTTP on {host}: bearer tokens, board tokens and admin "
        "actions cross the network in the clear. Give --tls-cert and --tls-key (or "
        "STATION_TLS_CERT / STATION_TLS_KEY); `station tls init --host NAME` makes a "
        "development pair."
    )


@dataclass(frozen=True)
class DevTls:
    cert: Path
    key: Path
    ca: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or len(host) > 253 or not all(c.isalnum() or c in "-.*" for c in host):
        raise PolicyError(f"{host!r} is not a host name or an IP address", code="bad-host")
    return x509.DNSName(host)


def init_dev_tls(settings: Settings, hosts: list[str], *, days: int = DEV_DAYS) -> DevTls:
    """A P-256 server key and a certificate for ``hosts`` under DATA_DIR/tls/.

    Signed by a throw-away CA (see the module's docstring for why not the
    station's CA). Codes: bad-host, no-host.
    """
    if not hosts:
        raise PolicyError("name at least one --host", code="no-host")
    names = [_san(h) for h in hosts]
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "provisioning station"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{settings.station_id} development TLS CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            key_usage(signs_certs=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            key_usage(digital_signature=True),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    d = settings.tls_dir
    out = DevTls(cert=d / "server.pem", key=d / "server.key", ca=d / "ca.pem")
    _write(
        out.key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    pem = serialization.Encoding.PEM
    # The server sends its certificate and the CA's, so a client needs only ca.pem.
    _write(out.cert, cert.public_bytes(pem) + ca_cert.public_bytes(pem), 0o644)
    _write(out.ca, ca_cert.public_bytes(pem), 0o644)
    return out
