"""The signed batch manifest: what shipped, signed by the CA key in the HSM.

``manifest.json`` is canonical JSON (UTF-8, keys sorted, no whitespace) of the
batch facts and one entry per verified board (the whitelist: device id, serial,
fingerprint, not-after). ``manifest.sig`` is a plain DER signature over the
SHA-256 of those bytes (ECDSA for an EC CA, PKCS#1 v1.5 for an RSA CA), made by
the CA key through PKCS#11, so OpenSSL checks it without the station::

    openssl x509 -in ca.pem -pubkey -noout > ca.pub.pem
    openssl dgst -sha256 -verify ca.pub.pem -signature manifest.sig manifest.json

The manifest is written streamed (hashed as it is written), so its size does
not bound memory for an EC CA; an RSA token key signs the whole message, so for
RSA the file is read back once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from station.ca import CertificateAuthority
from station.errors import Kind, StationError
from station.files import atomic_writer
from station.ledger import Ledger
from station.report.model import CaFacts, iso

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
CA_PEM = "ca.pem"
CA_PUB = "ca.pub.pem"

VERIFY_COMMANDS = (
    "openssl x509 -in ca.pem -pubkey -noout > ca.pub.pem\n"
    "openssl dgst -sha256 -verify ca.pub.pem -signature manifest.sig manifest.json"
)


class ManifestError(StationError):
    code = "bad-manifest"
    kind = Kind.INVALID


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ManifestFiles:
    manifest: Path
    signature: Path
    ca_pem: Path
    ca_pub: Path
    devices: int
    sha256: str


def _write_manifest(
    ledger: Ledger, batch_name: str, ca: CaFacts, path: Path, generated_at: str
) -> tuple[int, bytes]:
    """Write the canonical manifest; returns (entries, SHA-256 digest of the bytes)."""
    b = ledger.get_batch(batch_name)
    batch = {
        "name": b.name,
        "product": b.product,
        "key_mode": b.key_mode,
        "profile": {"subject_template": b.subject_template, "days": b.days},
        "station_id": b.station_id,
        "operator": b.operator,
        "planned": b.planned_count,
        "opened_at": iso(b.created_at),
        "closed_at": iso(b.closed_at),
    }
    ca_facts = {"subject": ca.subject, "fingerprint": ca.fingerprint}
    # Keys in sorted order, as canonical() would put them: batch, ca, devices,
    # generated_at, manifest_version; the devices array is streamed in between.
    head = '{"batch":' + canonical(batch) + ',"ca":' + canonical(ca_facts) + ',"devices":['
    tail = '],"generated_at":' + canonical(generated_at) + ',"manifest_version":1}'
    digest = hashlib.sha256()
    count = 0
    with atomic_writer(path) as fh:

        def put(text: str) -> None:
            data = text.encode("utf-8")
            digest.update(data)
            fh.write(data)

        put(head)
        for entry in ledger.whitelist(batch_name):
            item = {
                "device_id": entry.device_id,
                "fingerprint": entry.fingerprint,
                "not_after": iso(entry.not_after),
                "serial": entry.serial,
            }
            put(("," if count else "") + canonical(item))
            count += 1
        put(tail)
    return count, digest.digest()


def _sign(ca: CertificateAuthority, digest: bytes, manifest: Path) -> bytes:
    key = ca.key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    if isinstance(key, rsa.RSAPrivateKey):
        # Token RSA signs the whole message (CKM_SHA256_RSA_PKCS): same signature.
        return key.sign(manifest.read_bytes(), padding.PKCS1v15(), hashes.SHA256())
    raise ManifestError("the CA key is neither EC nor RSA", code="unsupported-key")


def write_signed_manifest(
    ledger: Ledger,
    batch: str,
    ca: CertificateAuthority,
    out_dir: Path,
    *,
    generated_at: str | None = None,
) -> ManifestFiles:
    """manifest.json, manifest.sig (through the HSM), ca.pem and ca.pub.pem in ``out_dir``."""
    from datetime import UTC, datetime

    out_dir.mkdir(parents=True, exist_ok=True)
    facts = CaFacts.from_certificate(ca.certificate)
    manifest = out_dir / MANIFEST
    stamp = generated_at or iso(datetime.now(UTC)) or ""
    count, digest = _write_manifest(ledger, batch, facts, manifest, stamp)
    signature = _sign(ca, digest, manifest)
    sig_path = out_dir / SIGNATURE
    sig_path.write_bytes(signature)
    ca_pem = out_dir / CA_PEM
    ca_pem.write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    ca_pub = out_dir / CA_PUB
    ca_pub.write_bytes(
        ca.certificate.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    _check(ca.certificate, manifest.read_bytes(), signature)  # never hand out a bad pair
    return ManifestFiles(manifest, sig_path, ca_pem, ca_pub, count, digest.hex())


@dataclass(frozen=True)
class ManifestCheck:
    batch: str
    devices: int
    ca_fingerprint: str


def _check(cert: x509.Certificate, data: bytes, signature: bytes) -> None:
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise ManifestError("the CA key is neither EC nor RSA", code="unsupported-key")
    except InvalidSignature:
        raise ManifestError(
            "the signature does not match the manifest and CA (edited, or another CA)",
            code="bad-signature",
        ) from None


def verify_manifest(manifest: Path, signature: Path, ca_pem: Path) -> ManifestCheck:
    """Check a manifest against its detached signature and the CA certificate.

    Codes: bad-signature (any edit of the manifest), bad-manifest (not the
    canonical JSON the station writes), ca-mismatch, not-found.
    """
    for p in (manifest, signature, ca_pem):
        if not p.is_file():
            raise ManifestError(f"no such file: {p}", code="not-found")
    try:
        cert = x509.load_pem_x509_certificates(ca_pem.read_bytes())[0]
    except ValueError:
        raise ManifestError(f"{ca_pem} is not a PEM certificate", code="bad-certificate") from None
    data = manifest.read_bytes()
    _check(cert, data, signature.read_bytes())
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ManifestError("the manifest is not UTF-8 JSON") from None
    if not isinstance(doc, dict) or canonical(doc).encode("utf-8") != data:
        raise ManifestError("the manifest is not in canonical form")
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    if doc.get("ca", {}).get("fingerprint") != fingerprint:
        raise ManifestError(
            "the manifest names another CA than the certificate given", code="ca-mismatch"
        )
    return ManifestCheck(str(doc["batch"]["name"]), len(doc["devices"]), fingerprint)
