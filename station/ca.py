"""The station's CA: a key in a PKCS#11 token, its certificate, and the device profile.

This module decides what a device certificate contains, and nothing else does:
the subject the caller vetted, the CSR's public key, and the station's own
extensions. No extension is ever copied from a CSR.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from hsm import HsmPrivateKey, KeyMismatch, KeyNotFound, KeyStore, KeyType, Pkcs11Uri, reset_module
from hsm.softhsm import ensure_dev_token, use_config
from station import keys_made
from station.errors import ConfigurationError, ConflictError, Kind, StationError
from station.filemodes import private_dir
from station.files import write_atomically
from station.policy import format_subject, parse_subject
from station.request import CertRequest
from station.settings import Settings

DEV_KEY_LABEL = "station-ca-key"
MAX_SERIAL_BITS = 159


def key_usage(
    *, digital_signature: bool = False, key_encipherment: bool = False, signs_certs: bool = False
) -> x509.KeyUsage:
    """A keyUsage with only what the station's certificates ever set:
    digitalSignature, keyEncipherment, or keyCertSign with cRLSign (a CA)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certs,
        crl_sign=signs_certs,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class DeviceProfile:
    """Validity of device certificates; the rest of the profile is fixed by this module."""

    days: int = 3650
    backdate_seconds: int = 300
    crl_url: str | None = None  # CRL distribution point (RFC 5280 4.2.1.13)
    ocsp_url: str | None = None  # AIA id-ad-ocsp (RFC 5280 4.2.2.1)

    def __post_init__(self) -> None:
        if not 1 <= self.days <= 36500:
            raise StationError(
                "device validity must be 1 to 36500 days", code="bad-days", kind=Kind.INVALID
            )
        if not 0 <= self.backdate_seconds <= 86400:
            raise StationError(
                "backdate must be 0 to 86400 seconds", code="bad-backdate", kind=Kind.INVALID
            )
        for url in (self.crl_url, self.ocsp_url):
            if url is not None:
                check_publication_url(url)


MAX_URL = 512


def check_publication_url(url: str) -> str:
    """A CRL or OCSP URL for device certificates: http(s), printable ASCII, no spaces.

    Relying parties fetch CRLs and OCSP over plain HTTP (RFC 5280, RFC 6960: the
    answers are signed), so http:// is the usual scheme; https:// is allowed.
    """
    if not (
        0 < len(url) <= MAX_URL
        and url.isascii()
        and url.isprintable()
        and " " not in url
        and (url.startswith("http://") or url.startswith("https://"))
        and len(url.split("://", 1)[1].split("/", 1)[0]) > 0
    ):
        raise StationError(
            f"a CRL or OCSP URL must be an http:// or https:// URL of at most {MAX_URL} "
            "printable ASCII characters",
            code="bad-url",
            kind=Kind.INVALID,
        )
    return url


def new_serial() -> int:
    """A random positive serial of at most 159 bits (RFC 5280 allows 20 octets, positive)."""
    while True:
        serial = secrets.randbits(MAX_SERIAL_BITS)
        if serial > 0:
            return serial


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _hash_for(key: HsmPrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


class CertificateAuthority:
    """The CA key (in the token) with its certificate; signs what the station vetted."""

    def __init__(
        self,
        keystore: KeyStore,
        key: HsmPrivateKey,
        certificate: x509.Certificate,
        parents: list[x509.Certificate] | None = None,
    ) -> None:
        self.keystore = keystore
        self.key = key
        self.certificate = certificate
        self.parents = parents or []
        self.hash_algorithm = _hash_for(key)
        self.is_rsa = isinstance(key, rsa.RSAPrivateKey)
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        self.chain_pem = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in [certificate, *self.parents]
        )
        self.fingerprint = certificate.fingerprint(hashes.SHA256()).hex()

    @property
    def key_uri(self) -> str:
        """The key's URI without any PIN."""
        return str(self.keystore.uri)

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        cert = builder.sign(self.key, self.hash_algorithm)
        # The token finds the key by its URI on every signature: if the key was
        # replaced (`station init --force` while this CA was open), the new key would
        # sign under the old certificate's name. Such a certificate never leaves.
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (InvalidSignature, ValueError, TypeError):
            raise KeyMismatch(
                f"the key named by {self.key_uri} no longer belongs to the CA certificate "
                "(replaced?); the station opens the CA again on its next use"
            ) from None
        return cert

    def issue(
        self,
        csr: CertRequest,
        *,
        subject: x509.Name,
        serial: int,
        profile: DeviceProfile,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Sign a device certificate for csr's key. Policy is the caller's job (station.policy)."""
        if not 0 < serial < 2**MAX_SERIAL_BITS:
            raise StationError(
                f"serial {serial} is outside 1 to 2**{MAX_SERIAL_BITS} - 1",
                code="bad-serial",
                kind=Kind.INVALID,
            )
        now = now or _utcnow()
        not_before = now - dt.timedelta(seconds=profile.backdate_seconds)
        not_after = min(now + dt.timedelta(days=profile.days), self.certificate.not_valid_after_utc)
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise StationError("only EC and RSA device keys are issued", code="unsupported-key")
        is_rsa_device = isinstance(public, rsa.RSAPublicKey)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                key_usage(digital_signature=True, key_encipherment=is_rsa_device),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(self._aki, critical=False)
        )
        if profile.crl_url is not None:
            builder = builder.add_extension(
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            full_name=[x509.UniformResourceIdentifier(profile.crl_url)],
                            relative_name=None,
                            reasons=None,
                            crl_issuer=None,
                        )
                    ]
                ),
                critical=False,
            )
        if profile.ocsp_url is not None:
            builder = builder.add_extension(
                x509.AuthorityInformationAccess(
                    [
                        x509.AccessDescription(
                            AuthorityInformationAccessOID.OCSP,
                            x509.UniformResourceIdentifier(profile.ocsp_url),
                        )
                    ]
                ),
                critical=False,
            )
        return self.sign_certificate(builder)

    def issue_verification_certificate(
        self, csr: x509.CertificateSigningRequest, *, days: int = 1
    ) -> x509.Certificate:
        """AWS IoT's proof that we hold the CA key: CN = registration code, short-lived.

        It is never a device identity: no clientAuth, and it expires within a day.
        """
        now = _utcnow()
        builder = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.certificate.subject)
            .public_key(csr.public_key())
            .serial_number(new_serial())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(
                min(now + dt.timedelta(days=days), self.certificate.not_valid_after_utc)
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(self._aki, critical=False)
        )
        return self.sign_certificate(builder)

    def chain_for(self, certificate: x509.Certificate) -> bytes:
        """What a board installs and presents: its certificate, then the CA's."""
        return certificate.public_bytes(serialization.Encoding.PEM) + self.chain_pem

    def health(self) -> None:
        """Raise an HsmError naming the cause unless the token answers and holds this CA's key."""
        self.keystore.health()
        if _spki(self.keystore.private_key()) != _spki(self.certificate):
            raise KeyMismatch(
                f"the key named by {self.key_uri} no longer belongs to the CA certificate "
                "(replaced?)"
            )

    def describe(self) -> dict[str, str]:
        key = self.key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            key_desc = f"EC {key.curve.name}"
        else:
            key_desc = f"RSA-{key.key_size}"
        return {
            "subject": format_subject(self.certificate.subject),
            "key": key_desc,
            "sha256_fingerprint": self.fingerprint,
            "serial": format(self.certificate.serial_number, "x"),
            "not_before": self.certificate.not_valid_before_utc.isoformat(),
            "not_after": self.certificate.not_valid_after_utc.isoformat(),
            "key_uri": self.key_uri,
        }


# -- opening and creating the CA ------------------------------------------------


def _activate_dev_token_config(settings: Settings) -> None:
    conf = settings.token_dir / "softhsm2.conf"
    if "SOFTHSM2_CONF" not in os.environ and conf.exists():
        use_config(conf)


def open_keystore(settings: Settings) -> KeyStore:
    uri = settings.resolved_ca_key_uri()
    if uri is None:
        raise ConfigurationError(
            "no CA key configured: run `station init`, or set STATION_CA_KEY_URI to the "
            "pkcs11: URI of the CA key"
        )
    _activate_dev_token_config(settings)
    return KeyStore(uri, default_module=settings.pkcs11_module)


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as exc:
        raise ConfigurationError(f"{path} is not a PEM certificate chain: {exc}") from None


def open_ca(settings: Settings) -> CertificateAuthority:
    """The configured CA, ready to sign. Raises ConfigurationError or an HsmError."""
    keystore = open_keystore(settings)
    if not settings.ca_cert_path.exists():
        raise ConfigurationError(
            f"no CA certificate at {settings.ca_cert_path}: run `station init` "
            "(or `station ca import-cert` after an external root signed the station's CSR)"
        )
    certs = _load_certs(settings.ca_cert_path)
    key = keystore.private_key()
    _check_matches(key, certs[0])
    return CertificateAuthority(keystore, key, certs[0], certs[1:])


def _spki(obj: HsmPrivateKey | x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    public = obj.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_matches(key: HsmPrivateKey, cert: x509.Certificate) -> None:
    if _spki(key) != _spki(cert):
        raise ConfigurationError(
            "the CA certificate does not belong to the key in the token; "
            "re-run `station ca import-cert` with the right certificate"
        )


@dataclass(frozen=True)
class InitOutcome:
    status: str  # "created", "kept", "replaced", "csr-written"
    message: str
    ca: CertificateAuthority | None = None
    csr_pem: bytes | None = None


def _ca_extensions(builder: x509.CertificateBuilder, public: object) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            key_usage(signs_certs=True),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public),  # type: ignore[arg-type]
            critical=False,
        )
    )


def default_ca_subject(settings: Settings) -> str:
    return f"/O=Provisioning Station/CN={settings.station_id[:40]} Device CA"


def init_ca(
    settings: Settings,
    *,
    key_type: KeyType = KeyType.EC_P256,
    subject: str | None = None,
    days: int = 7300,
    force: bool = False,
    csr_out: Path | None = None,
) -> InitOutcome:
    """Create the CA key in the token and a self-signed CA certificate (or a CSR for a root).

    Idempotent: with a CA in place it keeps it and says so. ``force`` makes a new
    key *beside* the old one (a new label) and a new certificate: no key is ever
    deleted here, it may be a key ceremony's (`station hsm delete-key` deletes a
    key the station made, on its own).
    """
    if not 1 <= days <= 36500:
        raise StationError("--days must be 1 to 36500", code="bad-argument")
    name = parse_subject(subject or default_ca_subject(settings))
    private_dir(settings.data_dir)
    if settings.resolved_ca_key_uri() is None:
        _conf, pin_file, created = ensure_dev_token(settings.token_dir, settings.dev_token_label)
        if created:
            reset_module(settings.pkcs11_module)
        uri = Pkcs11Uri(
            token=settings.dev_token_label,
            object=DEV_KEY_LABEL,
            module_path=settings.pkcs11_module,
            pin_source=str(pin_file.resolve()),
        )
        settings.ca_key_uri_path.write_text(uri.to_string() + "\n")
    keystore = open_keystore(settings)
    have_cert = settings.ca_cert_path.exists()
    have_key = keystore.has_key()
    if have_cert and have_key and not force and csr_out is None:
        ca = open_ca(settings)
        return InitOutcome("kept", "a CA already exists; kept it (use --force to replace)", ca)
    replaced = have_cert and force
    beside = ""
    if have_key and force:
        keystore, beside = _new_key_beside(settings, keystore)
        have_key = False
    if have_key:
        key = keystore.private_key()
        if have_cert and csr_out is None:  # pragma: no cover - handled above
            raise ConflictError("a CA already exists")
    else:
        key = keystore.generate_key(key_type)
        keys_made.record(settings, str(keystore.uri), key)
    hash_alg = _hash_for(key)
    if csr_out is not None:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hash_alg)
        )
        pem = csr.public_bytes(serialization.Encoding.PEM)
        write_atomically(csr_out, pem)
        return InitOutcome(
            "csr-written",
            f"wrote the station CA's CSR to {csr_out}; have the root sign it, then run "
            "`station ca import-cert CERT.pem`",
            csr_pem=pem,
        )
    now = _utcnow()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    cert = _ca_extensions(builder, key.public_key()).sign(key, hash_alg)
    write_atomically(settings.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
    ca = CertificateAuthority(keystore, key, cert)
    if replaced or beside:
        return InitOutcome("replaced", f"replaced the CA certificate (--force){beside or ''}", ca)
    return InitOutcome("created", "created the CA key in the token and its certificate", ca)


def _new_key_beside(settings: Settings, keystore: KeyStore) -> tuple[KeyStore, str]:
    """A key store for a new label next to the existing key, which is kept; and what to say.

    The new key's URI goes to DATA_DIR/ca-key.uri. With STATION_CA_KEY_URI set the
    operator must point it at the new key: the message says so.
    """
    old = keystore.uri
    stamp = _utcnow().strftime("%Y%m%dT%H%M%SZ")
    base = old.object or DEV_KEY_LABEL
    label = f"{base}-{stamp}"
    n = 1
    while keystore.has_key(label, None):
        n += 1
        label = f"{base}-{stamp}-{n}"
    new_uri = old.with_object(label, None)
    write_atomically(settings.ca_key_uri_path, (new_uri.to_string() + "\n").encode())
    new_store = KeyStore(new_uri, default_module=settings.pkcs11_module)
    message = (
        f"; the old key {old} stays in the token (delete it with "
        f"`station hsm delete-key --key-uri ...` if the station made it); "
        f"the new key is {new_uri}"
    )
    if settings.ca_key_uri:
        message += f"; set STATION_CA_KEY_URI to {new_uri}"
    return new_store, message


def import_ca_certificate(settings: Settings, pem: bytes) -> CertificateAuthority:
    """Install the CA certificate an external root issued for the station's key.

    The PEM may carry the issuing chain after the station's certificate.
    """
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise StationError("not a PEM certificate", code="bad-certificate") from None
    cert = certs[0]
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise StationError("the certificate is not a CA certificate", code="bad-certificate")
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        raise StationError(
            "the CA certificate lacks a subjectKeyIdentifier", code="bad-certificate"
        ) from None
    keystore = open_keystore(settings)
    try:
        key = keystore.private_key()
    except KeyNotFound:
        raise ConfigurationError("no CA key in the token: run `station init --csr-out`") from None
    if _spki(key) != _spki(cert):
        raise StationError(
            "the certificate's public key is not the key in the token", code="key-mismatch"
        )
    write_atomically(settings.ca_cert_path, pem)
    return CertificateAuthority(keystore, key, cert, certs[1:])
