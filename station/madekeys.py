"""RSA keys the station makes for a board, and wiping the station's copy.

Two channels hand a board a key the station made: the serial line pushes one into
an ARTIK Secure Element (``see-rsa``: station/line/provision.py) and EST
serverkeygen answers one (station/enroll/serverkeygen.py). Both make it here, as
unencrypted DER in a bytearray the caller zeroes with :func:`wipe` whatever
happens; what Python cannot wipe (immutable bytes on the way out) each caller's
docstring lists.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

RSA_BITS = 2048


def new_rsa_key(
    private_format: serialization.PrivateFormat,
) -> tuple[rsa.RSAPrivateKey, bytearray]:
    """A fresh RSA-2048 key and its private key as DER in ``private_format``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    der = bytearray(
        key.private_bytes(serialization.Encoding.DER, private_format, serialization.NoEncryption())
    )
    return key, der


def wipe(*buffers: bytearray) -> None:
    """Zero each buffer in place."""
    for buffer in buffers:
        buffer[:] = bytes(len(buffer))
