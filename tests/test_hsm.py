"""The key store against three real PKCS#11 implementations: SoftHSM2, a TPM 2.0, opencryptoki."""

from __future__ import annotations

import threading
import uuid

import pkcs11
import pkcs11.exceptions as p11e
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import KeyType as P11KeyType

from hsm import (
    KeyExists,
    KeyNotFound,
    KeyStore,
    KeyType,
    MechanismUnsupported,
    ModuleLoadError,
    Pkcs11Uri,
    TemplateRefused,
    TokenNotFound,
    WrongPin,
    reset_module,
)
from tests.fixtures.tokens import Token

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@pytest.fixture
def token(any_token: Token) -> Token:
    """The key-store tests run on SoftHSM2, tpm2-pkcs11 over swtpm and opencryptoki."""
    return any_token


def store(token: Token, obj: str, **extra: object) -> KeyStore:
    uri = Pkcs11Uri(
        token=token.label,
        object=f"{obj}-{uuid.uuid4().hex[:8]}",
        module_path=token.module,
        pin_source=str(token.pin_file),
        **extra,  # type: ignore[arg-type]
    )
    return KeyStore(uri, default_module=MODULE)


def objects_named(ks: KeyStore) -> list[str]:
    return sorted(cls for cls, label in ks.iter_objects() if label == ks.uri.object)


# RSA-4096 generation takes seconds in software: it runs only where it is refused
# (test_rsa_4096_on_a_tpm_is_refused_by_name).
@pytest.mark.parametrize("key_type", [k for k in KeyType if k != KeyType.RSA_4096])
def test_generated_keys_are_sensitive_non_extractable_sign_only(token, key_type) -> None:
    ks = store(token, f"k-{key_type.value}")
    if not token.can_make(key_type):
        # A token that cannot make this key says so by name, at once, and keeps nothing.
        with pytest.raises(MechanismUnsupported) as info:
            ks.generate_key(key_type)
        assert info.value.code == "hsm-mechanism-unsupported" and info.value.kind == "refused"
        assert objects_named(ks) == []
        return
    ks.generate_key(key_type)
    attrs = ks.private_key_attributes()
    assert attrs["TOKEN"] and attrs["SENSITIVE"] and attrs["NEVER_EXTRACTABLE"] and attrs["SIGN"]
    assert not attrs["EXTRACTABLE"]
    assert not attrs["DERIVE"] and not attrs["DECRYPT"] and not attrs["UNWRAP"]
    # Whatever template the token refused first left nothing behind: one pair.
    assert objects_named(ks) == ["PRIVATE_KEY", "PUBLIC_KEY"]


def test_private_key_value_cannot_be_read_or_wrapped_out(token) -> None:
    ks = store(token, "no-export")
    ks.generate_key(token.ca_key_type)
    label = ks.uri.object

    def attempt(session):
        priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        # SoftHSM and opencryptoki say "sensitive"; a TPM key has no value to read at all.
        with pytest.raises((pkcs11.exceptions.AttributeSensitive, p11e.AttributeTypeInvalid)):
            _ = priv[Attribute.VALUE if token.ca_key_type.is_ec else Attribute.PRIVATE_EXPONENT]
        try:
            priv[Attribute.EXTRACTABLE] = True
            flipped = True
        except (p11e.AttributeReadOnly, p11e.AttributeValueInvalid):
            flipped = False
        # tpm2-pkcs11 1.9 lets the flag be set back to TRUE (PKCS#11 forbids it); the
        # TPM object is still fixedTPM, its value unreadable (docs/hsm.md). `station hsm
        # check` then reports the key as extractable and fails, which is the safe side.
        assert flipped == (token.name == "tpm2")
        with pytest.raises((pkcs11.exceptions.AttributeSensitive, p11e.AttributeTypeInvalid)):
            _ = priv[Attribute.VALUE if token.ca_key_type.is_ec else Attribute.PRIVATE_EXPONENT]
        if Mechanism.AES_KEY_WRAP_PAD not in set(session.token.slot.get_mechanisms()):
            return True  # the token cannot wrap at all
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
    ks.generate_key(token.ca_key_type)
    with pytest.raises(KeyExists):
        ks.generate_key(token.ca_key_type)


def test_ec_signatures_verify_with_the_public_key(token) -> None:
    for kt, alg in ((KeyType.EC_P256, hashes.SHA256()), (KeyType.EC_P384, hashes.SHA384())):
        if not token.can_make(kt):
            continue  # the refusal itself is tested above
        key = store(token, f"sig-{kt.value}").generate_key(kt)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        sig = key.sign(b"message", ec.ECDSA(alg))
        key.public_key().verify(sig, b"message", ec.ECDSA(alg))
        digest = hashes.Hash(alg)
        digest.update(b"message")
        pre = key.sign(digest.finalize(), ec.ECDSA(utils.Prehashed(alg)))
        key.public_key().verify(pre, b"message", ec.ECDSA(alg))


@pytest.mark.parametrize(
    "pad",
    [
        padding.PKCS1v15(),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
    ],
    ids=["pkcs1v15", "pss"],
)
def test_rsa_signatures_verify_with_the_public_key(token, pad) -> None:
    key = store(token, "sig-rsa").generate_key(KeyType.RSA_2048)
    assert isinstance(key, rsa.RSAPrivateKey)
    sig = key.sign(b"message", pad, hashes.SHA256())
    key.public_key().verify(sig, b"message", pad, hashes.SHA256())


def test_wrong_pin_is_a_typed_error_without_the_pin(token) -> None:
    ks = KeyStore(
        Pkcs11Uri(token=token.label, object="x", pin_value="bad-4711", module_path=token.module),
        default_module=MODULE,
    )
    # the right PIN is already logged in for this process; drop that session first
    reset_module(token.module)
    with pytest.raises(WrongPin) as info:
        ks.has_key()
    assert "bad-4711" not in str(info.value)
    assert "pin-source" in str(info.value)
    # A PIN refused once is never offered again (the token would lock it).
    with pytest.raises(WrongPin, match="before"):
        ks.has_key()


def test_unknown_token_names_the_fix(token) -> None:
    ks = KeyStore(
        Pkcs11Uri(token="no-such-token", object="x", module_path=token.module),
        default_module=MODULE,
    )
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
    ks.generate_key(token.ca_key_type)
    ks.health()
    ks.delete_key()
    with pytest.raises(KeyNotFound):
        ks.health()
    assert objects_named(ks) == []


def test_session_recovers_after_module_reinitialised(token) -> None:
    ks = store(token, "recover")
    key = ks.generate_key(token.ca_key_type)
    reset_module(token.module)  # every session of the process is gone
    _sign_and_verify(key, b"again")


def _sign_and_verify(key, msg: bytes) -> None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(msg, ec.ECDSA(hashes.SHA256()))
        key.public_key().verify(sig, msg, ec.ECDSA(hashes.SHA256()))
    else:
        sig = key.sign(msg, padding.PKCS1v15(), hashes.SHA256())
        key.public_key().verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())


def test_concurrent_threads_sign_without_crash_or_corruption(token) -> None:
    key = store(token, "threads").generate_key(token.ca_key_type)
    errors: list[BaseException] = []
    rounds = 150 if token.name == "softhsm" else 10  # a TPM signs ~100/s

    def work(n: int) -> None:
        try:
            for i in range(rounds):
                _sign_and_verify(key, f"{n}-{i}".encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize(
    ("refusal", "error", "code"),
    [
        (p11e.TemplateInconsistent, TemplateRefused, "hsm-template-refused"),
        (p11e.AttributeValueInvalid, TemplateRefused, "hsm-template-refused"),
        (p11e.MechanismInvalid, MechanismUnsupported, "hsm-mechanism-unsupported"),
        (p11e.KeyTypeInconsistent, MechanismUnsupported, "hsm-mechanism-unsupported"),
    ],
)
def test_a_refusal_is_named_and_never_retried(token, refusal, error, code) -> None:
    """The real token's session runs the call; the call's own answer is a refusal."""
    ks = store(token, "refused")
    calls: list[int] = []

    def refused(session):
        calls.append(1)
        raise refusal()

    with pytest.raises(error) as info:
        ks.call(refused)
    assert calls == [1]
    assert info.value.code == code and info.value.kind == "refused"
    assert "CKR_" in str(info.value)


def test_signing_uses_the_mechanisms_the_token_lists(token) -> None:
    ks = store(token, "mechs")
    offered = ks.mechanisms()
    assert offered  # every tested token lists its mechanisms
    if token.name == "opencryptoki":
        # No hash-and-sign RSA PKCS#1 v1.5 here: the station builds the DigestInfo.
        assert Mechanism.SHA256_RSA_PKCS not in offered and Mechanism.RSA_PKCS in offered
        assert Mechanism.EC_KEY_PAIR_GEN not in offered
    else:
        assert Mechanism.ECDSA in offered


def test_ecdsa_falls_back_to_the_hashing_mechanism(token) -> None:
    """A token listing CKM_ECDSA_SHA256 but not CKM_ECDSA still signs (message, not digest)."""
    if not token.can_make(KeyType.EC_P256):
        return  # opencryptoki: no EC at all (refusal tested above)
    key = store(token, "ecdsa-sha").generate_key(KeyType.EC_P256)
    ref = key._ref
    offered = ref.mechanisms()
    seen: list[Mechanism] = []

    class WithoutEcdsa:
        def mechanisms(self):
            return offered - {Mechanism.ECDSA}

        def sign(self, data, mechanism, mechanism_param=None):
            seen.append(mechanism)
            return ref.sign(data, mechanism, mechanism_param)

    key._ref = WithoutEcdsa()  # type: ignore[assignment]
    if Mechanism.ECDSA_SHA256 not in offered:
        with pytest.raises(MechanismUnsupported):
            key.sign(b"m", ec.ECDSA(hashes.SHA256()))
        return
    sig = key.sign(b"m", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(sig, b"m", ec.ECDSA(hashes.SHA256()))
    assert seen == [Mechanism.ECDSA_SHA256]


def test_rsa_4096_on_a_tpm_is_refused_by_name(tpm2_token: Token) -> None:
    ks = store(tpm2_token, "rsa4096")
    with pytest.raises(MechanismUnsupported) as info:
        ks.generate_key(KeyType.RSA_4096)
    assert info.value.code == "hsm-mechanism-unsupported"
    assert "1024 to 3072 bits" in str(info.value)
    assert objects_named(ks) == []


def test_tpm_sessions_survive_a_restart_of_the_resource_manager(tpm2_token: Token) -> None:
    """tpm2-abrmd restarted mid-run: the store reopens and logs in again, once."""
    stack = tpm2_token.stack
    assert stack is not None
    key = store(tpm2_token, "abrmd").generate_key(KeyType.EC_P256)
    _sign_and_verify(key, b"before")
    stack.stop_abrmd()
    stack.start_abrmd()
    _sign_and_verify(key, b"after")
    _sign_and_verify(key, b"and again")


def test_certificate_builder_calls_the_token_signer(softhsm_token: Token) -> None:
    """Guards the pinned cryptography range: builders must call our sign()."""
    key = store(softhsm_token, "builder").generate_key(KeyType.EC_P256)
    calls: list[bytes] = []
    original = key._ref

    class Spy:
        def sign(self, data: bytes, mechanism: Mechanism, mechanism_param=None) -> bytes:
            calls.append(data)
            return original.sign(data, mechanism, mechanism_param)

        def mechanisms(self):
            return original.mechanisms()

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
