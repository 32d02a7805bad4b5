"""The key store against a real SoftHSM2 token."""

from __future__ import annotations

import threading
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import KeyType as P11KeyType

from hsm import (
    KeyExists,
    KeyNotFound,
    KeyStore,
    KeyType,
    ModuleLoadError,
    Pkcs11Uri,
    TokenNotFound,
    WrongPin,
    reset_module,
)
from hsm.softhsm import ensure_dev_token

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    home = tmp_path_factory.mktemp("tok")
    _, pin_file, created = ensure_dev_token(home, "hsm-tests")
    assert created
    reset_module(MODULE)
    return "hsm-tests", pin_file


def store(token: tuple[str, Path], obj: str, **extra: object) -> KeyStore:
    label, pin_file = token
    uri = Pkcs11Uri(token=label, object=obj, pin_source=str(pin_file), **extra)  # type: ignore[arg-type]
    return KeyStore(uri, default_module=MODULE)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_generated_keys_are_sensitive_non_extractable_sign_only(token, key_type) -> None:
    ks = store(token, f"k-{key_type.value}")
    ks.generate_key(key_type)
    attrs = ks.private_key_attributes()
    assert attrs["TOKEN"] and attrs["SENSITIVE"] and attrs["NEVER_EXTRACTABLE"] and attrs["SIGN"]
    assert not attrs["EXTRACTABLE"]
    assert not attrs["DERIVE"] and not attrs["DECRYPT"] and not attrs["UNWRAP"]


def test_private_key_value_cannot_be_read_or_wrapped_out(token) -> None:
    ks = store(token, "no-export")
    ks.generate_key(KeyType.EC_P256)

    def attempt(session):
        priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="no-export")
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            _ = priv[Attribute.VALUE]
        with pytest.raises(pkcs11.exceptions.AttributeReadOnly):
            priv[Attribute.EXTRACTABLE] = True
        wrapper = session.generate_key(
            P11KeyType.AES,
            256,
            label="wrapper",
            store=False,
            capabilities=pkcs11.MechanismFlag.WRAP | pkcs11.MechanismFlag.ENCRYPT,
        )
        with pytest.raises(pkcs11.exceptions.KeyUnextractable):
            wrapper.wrap_key(priv, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        return True

    assert ks.call(attempt)
    key = ks.private_key()
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    with pytest.raises(UnsupportedAlgorithm):
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def test_generate_refuses_to_overwrite(token) -> None:
    ks = store(token, "twice")
    ks.generate_key(KeyType.EC_P256)
    with pytest.raises(KeyExists):
        ks.generate_key(KeyType.EC_P256)


def test_ec_signatures_verify_with_the_public_key(token) -> None:
    for kt, alg in ((KeyType.EC_P256, hashes.SHA256()), (KeyType.EC_P384, hashes.SHA384())):
        key = store(token, f"sig-{kt.value}").generate_key(kt)
        sig = key.sign(b"message", ec.ECDSA(alg))
        key.public_key().verify(sig, b"message", ec.ECDSA(alg))


def test_rsa_signatures_verify_with_the_public_key(token) -> None:
    key = store(token, "sig-rsa").generate_key(KeyType.RSA_2048)
    sig = key.sign(b"message", padding.PKCS1v15(), hashes.SHA256())
    key.public_key().verify(sig, b"message", padding.PKCS1v15(), hashes.SHA256())


def test_wrong_pin_is_a_typed_error_without_the_pin(token) -> None:
    label, _ = token
    ks = KeyStore(
        Pkcs11Uri(token=label, object="x", pin_value="not-the-pin-4711"), default_module=MODULE
    )
    # the right PIN is already logged in for this process; drop that session first
    reset_module(MODULE)
    with pytest.raises(WrongPin) as info:
        ks.has_key()
    assert "not-the-pin-4711" not in str(info.value)
    assert "pin-source" in str(info.value)


def test_unknown_token_names_the_fix(token) -> None:
    ks = KeyStore(Pkcs11Uri(token="no-such-token", object="x"), default_module=MODULE)
    with pytest.raises(TokenNotFound, match="pkcs11-tool"):
        ks.has_key()


def test_module_not_loadable(tmp_path) -> None:
    bogus = tmp_path / "libnothing.so"
    bogus.write_bytes(b"not a library")
    ks = KeyStore(Pkcs11Uri(token="t", object="x", module_path=str(bogus)), default_module=MODULE)
    with pytest.raises(ModuleLoadError, match="module-path"):
        ks.has_key()


def test_missing_key_is_reported(token) -> None:
    ks = store(token, "never-made")
    assert not ks.has_key()
    with pytest.raises(KeyNotFound, match="station init"):
        ks.private_key()


def test_deleted_key_fails_health(token) -> None:
    ks = store(token, "deleted")
    ks.generate_key(KeyType.EC_P256)
    ks.health()
    ks.delete_key()
    with pytest.raises(KeyNotFound):
        ks.health()


def test_session_recovers_after_module_reinitialised(token) -> None:
    ks = store(token, "recover")
    key = ks.generate_key(KeyType.EC_P256)
    reset_module(MODULE)  # every session of the process is gone
    sig = key.sign(b"again", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(sig, b"again", ec.ECDSA(hashes.SHA256()))


def test_concurrent_threads_sign_without_crash_or_corruption(token) -> None:
    key = store(token, "threads").generate_key(KeyType.EC_P256)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(150):
                msg = f"{n}-{i}".encode()
                sig = key.sign(msg, ec.ECDSA(hashes.SHA256()))
                key.public_key().verify(sig, msg, ec.ECDSA(hashes.SHA256()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_certificate_builder_calls_the_token_signer(token) -> None:
    """Guards the pinned cryptography range: builders must call our sign()."""
    key = store(token, "builder").generate_key(KeyType.EC_P256)
    calls: list[bytes] = []
    original = key._ref

    class Spy:
        def sign(self, data: bytes, mechanism: Mechanism) -> bytes:
            calls.append(data)
            return original.sign(data, mechanism)

    key._ref = Spy()  # type: ignore[assignment]
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t")])
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert len(calls) == 1 and len(calls[0]) == 32  # a SHA-256 digest went to CKM_ECDSA
    key.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    assert csr.is_signature_valid and len(calls) == 2
