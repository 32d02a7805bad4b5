"""The key that protects the station's CMP answers: a key of its own in the CA's token.

Not the CA key: a CMP protection certificate must carry keyUsage
digitalSignature (RFC 9483 section 3.2; `openssl cmp` refuses one without it),
which a CA certificate for certificate signing does not have, and an imported CA
under a company root cannot be given. A key of its own also keeps the CA key to
one job, signing certificates. So the token holds a second key, label
``station-cmp-key`` (EC P-256, sensitive, non-extractable, sign only), made at the
first CMP request; the CA certifies it once (keyUsage digitalSignature,
extendedKeyUsage id-kp-cmcRA, validity the CA's) into ``DATA_DIR/cmp.pem``, and
the audit log records it. Clients trust the station CA (``-trusted ca.pem``) and
find the certificate in extraCerts. The certificate is signed by the device CA, so
AWS IoT would register it if it were ever presented there; it is on no whitelist,
so the JITR Lambda revokes it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsm import KeyType
from station.ca import CertificateAuthority, key_usage, new_serial
from station.settings import Settings

KEY_LABEL = "station-cmp-key"
CMC_RA = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")
_ = ExtendedKeyUsageOID


@dataclass(frozen=True)
class CmpResponder:
    key: Any
    certificate: x509.Certificate


def _certify(ca: CertificateAuthority, public: Any, station_id: str) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            *[a for a in ca.certificate.subject if a.oid == NameOID.ORGANIZATION_NAME][:1],
            x509.NameAttribute(NameOID.COMMON_NAME, f"{station_id[:40]} CMP responder"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(public)
        .serial_number(new_serial())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(ca.certificate.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            key_usage(digital_signature=True),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([CMC_RA]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    return ca.sign_certificate(builder)


def open_responder(settings: Settings, ca: CertificateAuthority) -> tuple[CmpResponder, bool]:
    """The CMP responder key and certificate, made on first use; (responder, made now)."""
    path = settings.data_dir / "cmp.pem"
    lock_path = settings.data_dir / "cmp.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # workers starting together make one key
        store = ca.keystore
        made = False
        if store.has_key(label=KEY_LABEL):
            key = store.private_key(label=KEY_LABEL)
        else:
            key = store.generate_key(KeyType.EC_P256, label=KEY_LABEL)
            made = True
        cert = None
        if path.exists() and not made:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            same_key = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ) == key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if not same_key or cert.issuer != ca.certificate.subject:
                cert = None
        if cert is None:
            cert = _certify(ca, key.public_key(), settings.station_id)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            os.replace(tmp, path)
            made = True
        return CmpResponder(key, cert), made
    finally:
        os.close(fd)
