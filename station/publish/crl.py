"""The station's CRL (RFC 5280 section 5), signed by the CA key in the token.

A CRL carries a CRL number, the authority key identifier, thisUpdate and
nextUpdate, and one entry per revoked certificate (with its reason code when the
ledger's reason names one). CRLs are kept in the ledger's ``crls`` table, so every
worker and every station on a shared ledger serves the same one, and ``current()``
makes a new one when the stored one is out of date: a revocation it does not list
(revocations are never undone, so counting them is enough), half its validity
gone, or signed under another CA certificate. So the CRL is made again on the
first request after every revocation and well before its nextUpdate.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID
from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from station.ca import CertificateAuthority
from station.errors import ConflictError, StationError
from station.ledger.db import write_transaction
from station.ledger.schema import crls
from station.publish.revoked import revocations, revoked_count

DEFAULT_VALIDITY = dt.timedelta(hours=24)
KEEP = 3  # CRLs kept in the table (the newest is the one served)


@dataclass(frozen=True, slots=True)
class Crl:
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    revoked_count: int
    der: bytes

    @property
    def pem(self) -> bytes:
        return x509.load_der_x509_crl(self.der).public_bytes(serialization.Encoding.PEM)


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def build_crl(
    ca: CertificateAuthority,
    entries: list[x509.RevokedCertificate],
    *,
    number: int,
    this_update: dt.datetime,
    validity: dt.timedelta = DEFAULT_VALIDITY,
) -> x509.CertificateRevocationList:
    """Sign a CRL listing ``entries`` with the CA key (a PKCS#11 signature)."""
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    # All entries through the constructor: add_revoked_certificate() copies the list
    # into a new builder on every call, quadratic in the entries (100,000 revocations
    # took minutes instead of a second).
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=ca.certificate.subject,
        last_update=this_update,
        next_update=this_update + validity,
        extensions=[
            x509.Extension(ExtensionOID.CRL_NUMBER, False, x509.CRLNumber(number)),
            x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki),
        ],
        revoked_certificates=list(entries),
    )
    return builder.sign(ca.key, ca.hash_algorithm)


def revoked_entries(engine: Engine) -> list[x509.RevokedCertificate]:
    out = []
    for r in revocations(engine):
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(r.serial)
            .revocation_date(r.revoked_at.replace(microsecond=0))
        )
        if r.reason is not None:
            entry = entry.add_extension(x509.CRLReason(r.reason), critical=False)
        out.append(entry.build())
    return out


def _latest(engine: Engine) -> tuple[Crl, str] | None:
    """The newest stored CRL and the fingerprint of the CA certificate it was signed under."""
    with engine.connect() as conn:
        row = conn.execute(select(crls).order_by(crls.c.number.desc()).limit(1)).first()
    if row is None:
        return None
    return Crl(
        number=row.number,
        this_update=_utc(row.this_update),
        next_update=_utc(row.next_update),
        revoked_count=row.revoked_count,
        der=bytes(row.der),
    ), str(row.ca_fingerprint)


def latest(engine: Engine, ca: CertificateAuthority) -> Crl | None:
    """The newest stored CRL signed under this CA certificate, or None."""
    found = _latest(engine)
    if found is None:
        return None
    crl, fingerprint = found
    return crl if fingerprint == ca.fingerprint else None


def _is_current(crl: Crl, count: int, now: dt.datetime) -> bool:
    half = (crl.next_update - crl.this_update) / 2
    return crl.revoked_count == count and now < crl.this_update + half


def generate(
    engine: Engine,
    ca: CertificateAuthority,
    station_id: str,
    *,
    validity: dt.timedelta = DEFAULT_VALIDITY,
    now: dt.datetime | None = None,
) -> Crl:
    """Sign a new CRL of every revocation in the ledger and store it; returns it."""
    for _attempt in range(5):
        now = _utc(now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
        count = revoked_count(engine)
        entries = revoked_entries(engine)
        previous = _latest(engine)
        number = previous[0].number + 1 if previous else 1
        crl = build_crl(ca, entries, number=number, this_update=now, validity=validity)
        der = crl.public_bytes(serialization.Encoding.DER)
        made = Crl(number, now, now + validity, max(count, len(entries)), der)
        try:
            with write_transaction(engine) as conn:
                conn.execute(
                    crls.insert().values(
                        number=number,
                        ca_fingerprint=ca.fingerprint,
                        this_update=now,
                        next_update=now + validity,
                        revoked_count=made.revoked_count,
                        station_id=station_id,
                        der=der,
                    )
                )
                conn.execute(delete(crls).where(crls.c.number <= number - KEEP))
        except IntegrityError:
            now = None  # another worker took this number: make the next one
            continue
        return made
    raise ConflictError("could not store a new CRL (numbers kept colliding)", code="crl-conflict")


def current(
    engine: Engine,
    ca: CertificateAuthority,
    station_id: str,
    *,
    validity: dt.timedelta = DEFAULT_VALIDITY,
) -> Crl:
    """The CRL to publish now: the stored one while it is current, else a new one."""
    now = dt.datetime.now(dt.UTC)
    crl = latest(engine, ca)
    if crl is not None and _is_current(crl, revoked_count(engine), now):
        return crl
    return generate(engine, ca, station_id, validity=validity)


def check_validity_hours(hours: int) -> dt.timedelta:
    if not 1 <= hours <= 24 * 31:
        raise StationError("CRL validity must be 1 to 744 hours", code="bad-argument")
    return dt.timedelta(hours=hours)
