"""Server-side key generation (EST serverkeygen, RFC 7030 section 4.4): a key for a
board that cannot make one.

Only for batches whose keys the station makes (``see-rsa``: RSA-2048, the key the
serial line pushes into an ARTIK Secure Element) that an operator opted in
(``STATION_EST_SERVERKEYGEN_BATCHES``, none by default); a ``board-ecc`` board makes
its own key and uses simpleenroll. The key is made in software, not in the token: the
board needs the private key, and a token key is non-extractable by design. The
station builds and signs a CSR with it for the board's subject, so the certificate
comes out of the one issuance path like any other (policy, intent, HSM signature,
ledger, audit; a fresh key can never be a duplicate, and a board that already has
a live certificate is refused ``already-provisioned``).

Wiping, as the serial line does for ARTIK keys (station/line/provision.py), as far
as Python allows. Zeroed by :func:`wipe` whatever happens: the PKCS#8 DER and the
answer built from it, both bytearrays (the answer allocated once at its final size
and the key read through views, so no grown-and-abandoned buffer or slice copy of
them is left: station/enroll/est.py). Not wiped, because Python cannot overwrite
immutable ``bytes``, only drop them, and they are freed, not cleared: the bytes
``private_bytes`` returns, the 64-character line ``base64.b64encode`` returns for
each 48 bytes of the key, the body ``bytes`` the HTTP server is handed, and the
copies the server and TLS make of it. The key object is dropped (OpenSSL clears
its private numbers when it frees them). The key never touches the station's
disk, the ledger or the logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from station.errors import Kind, StationError
from station.ledger.schema import KeyMode
from station.madekeys import RSA_BITS, new_rsa_key, wipe

__all__ = ["RSA_BITS", "STATION_MADE", "MadeKey", "check_enabled", "make_key", "wipe"]

#: Key modes whose keys the station makes: serverkeygen serves these batches only.
STATION_MADE = frozenset({KeyMode.SEE_RSA.value})


def check_enabled(batch: str, enabled: frozenset[str]) -> None:
    """Refuse unless the operator opted ``batch`` in (``STATION_EST_SERVERKEYGEN_BATCHES``).

    A ``see-rsa`` key otherwise only ever goes into a board's Secure Element over the
    serial line; handing one out over the network, to any holder of a board token, is
    a choice made per batch, off by default. Codes: est-serverkeygen-not-enabled.
    """
    if batch not in enabled:
        raise StationError(
            f"serverkeygen is not enabled for batch {batch!r}: an operator lists it in "
            "STATION_EST_SERVERKEYGEN_BATCHES",
            code="est-serverkeygen-not-enabled",
            kind=Kind.FORBIDDEN,
        )


@dataclass
class MadeKey:
    pkcs8: bytearray  # the private key, DER PrivateKeyInfo: wipe() it
    csr: x509.CertificateSigningRequest  # signed with it, for the issuer


def make_key(subject: x509.Name) -> MadeKey:
    """A fresh RSA-2048 key and a CSR for ``subject`` signed with it."""
    key: rsa.RSAPrivateKey | None
    key, der = new_rsa_key(serialization.PrivateFormat.PKCS8)
    try:
        builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
        csr = builder.sign(key, hashes.SHA256())
    except Exception:
        wipe(der)
        raise
    finally:
        key = None
    return MadeKey(der, csr)
