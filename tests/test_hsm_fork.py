"""A forked child notices the fork and opens its own PKCS#11 session (hsm/keystore.py).

The parent's logged-in session and object handles are not valid in a child
(PKCS#11 has no fork semantics); the child must drop them and log in afresh,
and a signature made there must verify.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hsm import KeyStore, KeyType, Pkcs11Uri, reset_module
from hsm.softhsm import ensure_dev_token

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@pytest.fixture
def keystore(tmp_path: Path) -> KeyStore:
    _, pin_file, _ = ensure_dev_token(tmp_path, "fork-tests")
    reset_module(MODULE)
    uri = Pkcs11Uri(token="fork-tests", object="fork-key", pin_source=str(pin_file))
    ks = KeyStore(uri, default_module=MODULE)
    ks.generate_key(KeyType.EC_P256)
    return ks


def test_a_forked_child_signs_with_a_session_of_its_own(keystore: KeyStore) -> None:
    key = keystore.private_key()
    public = key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(
        key.sign(b"parent", ec.ECDSA(hashes.SHA256())), b"parent", ec.ECDSA(hashes.SHA256())
    )

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report 0 on a good signature, anything else otherwise
        status = 1
        try:
            os.close(read)
            child_key = keystore.private_key()
            signature = child_key.sign(b"child", ec.ECDSA(hashes.SHA256()))
            public.verify(signature, b"child", ec.ECDSA(hashes.SHA256()))
            status = 0
        finally:
            os.write(write, bytes([status]))
            os._exit(status)
    os.close(write)
    report = os.read(read, 1)
    _, code = os.waitpid(pid, 0)
    assert report == b"\x00" and os.waitstatus_to_exitcode(code) == 0
    # The parent's own session still works after the child logged in and out.
    key.sign(b"again", ec.ECDSA(hashes.SHA256()))
