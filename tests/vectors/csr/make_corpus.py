"""Generate the hostile-CSR corpus once: ``python tests/vectors/csr/make_corpus.py``.

Every file here must be refused by the station (API and CLI) with a 4xx and a
reason code; ``expected.json`` maps each file name to the code it must be refused
with. The files are committed; rerunning the script makes new keys (so new
bytes) but the same cases. Subjects use the test batches' template
``/O=company/OU=team/CN={device_id}/C=US`` with device id ``hostile-1``, so a
refusal is never a mere subject mismatch unless the case is about the subject.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

HERE = Path(__file__).resolve().parent
DEVICE_ID = "hostile-1"
PEM, DER = serialization.Encoding.PEM, serialization.Encoding.DER


def subject(cn: str = DEVICE_ID, **extra: str) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, extra.get("O", "company")),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "team"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    ]
    return x509.Name(attrs)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr(
    name: x509.Name | None = None,
    key: object = None,
    alg: hashes.HashAlgorithm | None = hashes.SHA256(),  # noqa: B008
    exts: Sequence[tuple[x509.ExtensionType, bool]] | None = None,
) -> x509.CertificateSigningRequest:
    key = key if key is not None else p256()
    builder = x509.CertificateSigningRequestBuilder().subject_name(name or subject())
    for ext, critical in exts or []:
        builder = builder.add_extension(ext, critical=critical)
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        alg = None
    return builder.sign(key, alg)  # type: ignore[arg-type]


def der(c: x509.CertificateSigningRequest) -> bytes:
    return c.public_bytes(DER)


def pem(c: x509.CertificateSigningRequest) -> bytes:
    return c.public_bytes(PEM)


def der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + der_len(len(value)) + value


def raw_name_csr(name_der: bytes) -> bytes:
    """A P-256 CSR whose subject is the given raw DER Name (signature valid)."""
    key = p256()
    spki = key.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    info = tlv(0x30, tlv(0x02, b"\x00") + name_der + spki + tlv(0xA0, b""))
    sig = key.sign(info, ec.ECDSA(hashes.SHA256()))
    alg = tlv(0x30, tlv(0x06, bytes.fromhex("2a8648ce3d040302")))  # ecdsa-with-SHA256
    return tlv(0x30, info + alg + tlv(0x03, b"\x00" + sig))


def name_der(cn_tag: int, cn_value: bytes) -> bytes:
    def rdn(oid: bytes, tag: int, value: bytes) -> bytes:
        return tlv(0x31, tlv(0x30, tlv(0x06, oid) + tlv(tag, value)))

    o, ou, cn, c = (bytes.fromhex(h) for h in ("55040a", "55040b", "550403", "550406"))
    return tlv(
        0x30,
        rdn(o, 0x0C, b"company") + rdn(ou, 0x0C, b"team") + rdn(cn, cn_tag, cn_value)
        + rdn(c, 0x13, b"US"),
    )  # fmt: skip


def wrong_signature() -> bytes:
    raw = bytearray(der(csr()))
    raw[-5] ^= 0x01  # inside the ECDSA signature's s integer
    return bytes(raw)


def resigned(
    info: bytes, key: ec.EllipticCurvePrivateKey, hash_alg: hashes.HashAlgorithm, oid_hex: str
) -> bytes:
    """A CSR around ``info`` signed by ``key`` with ECDSA over ``hash_alg``."""
    sig = key.sign(info, ec.ECDSA(hash_alg))
    alg = tlv(0x30, tlv(0x06, bytes.fromhex(oid_hex)))
    return tlv(0x30, info + alg + tlv(0x03, b"\x00" + sig))


def other_key_signature() -> bytes:
    """The CertificationRequestInfo of one key, signed by another."""
    return resigned(csr().tbs_certrequest_bytes, p256(), hashes.SHA256(), "2a8648ce3d040302")


def sha1_signed() -> bytes:
    """cryptography's builder refuses SHA-1, a board's OpenSSL may not."""
    key = p256()
    info = csr(key=key).tbs_certrequest_bytes
    return resigned(info, key, hashes.SHA1(), "2a8648ce3d0401")  # noqa: S303 - the point


def unknown_curve() -> bytes:
    """A P-256 key whose SPKI names curve 1.2.840.10045.3.1.99 (no such curve), signed."""
    key = p256()
    info = csr(key=key).tbs_certrequest_bytes
    p256_oid, bogus = bytes.fromhex("2a8648ce3d030107"), bytes.fromhex("2a8648ce3d030163")
    assert info.count(p256_oid) == 1
    return resigned(info.replace(p256_oid, bogus), key, hashes.SHA256(), "2a8648ce3d040302")


def version_2() -> bytes:
    """A CSR claiming version 2 (value 1; only v1 = 0 exists), signed."""
    key = p256()
    info = csr(key=key).tbs_certrequest_bytes
    head = 2 + (info[1] & 0x7F if info[1] & 0x80 else 0)  # SEQUENCE tag and length
    assert info[head : head + 3] == b"\x02\x01\x00"
    info = info[:head] + b"\x02\x01\x01" + info[head + 3 :]
    return resigned(info, key, hashes.SHA256(), "2a8648ce3d040302")


def nested_extension() -> bytes:
    """basicConstraints whose value is 300 nested SEQUENCEs around cA TRUE."""
    value = b"\x01\x01\xff"
    for _ in range(300):
        value = tlv(0x30, value)
    oid = x509.oid.ExtensionOID.BASIC_CONSTRAINTS
    return der(csr(exts=[(x509.UnrecognizedExtension(oid, value), True)]))


def huge_extension() -> bytes:
    big = x509.UnrecognizedExtension(
        ObjectIdentifier("1.3.6.1.4.1.99999.2"), tlv(0x04, b"A" * 15000)
    )
    return der(csr(exts=[(big, False)]))


def too_large() -> bytes:
    big = x509.UnrecognizedExtension(
        ObjectIdentifier("1.3.6.1.4.1.99999.3"), tlv(0x04, b"A" * 40000)
    )
    return der(csr(exts=[(big, False)]))


def many_extensions() -> bytes:
    exts = [
        (
            x509.UnrecognizedExtension(ObjectIdentifier(f"1.3.6.1.4.1.99999.10.{i}"), b"\x05\x00"),
            False,
        )
        for i in range(40)
    ]
    return der(csr(exts=exts))


def self_signed_cert() -> bytes:
    key = p256()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject())
        .issuer_name(subject())
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(PEM)


def pem_of(der_bytes: bytes) -> bytes:
    body = base64.encodebytes(der_bytes).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [b"-----BEGIN CERTIFICATE REQUEST-----", *lines, b"-----END CERTIFICATE REQUEST-----", b""]
    )


def relabel(data: bytes, label: bytes) -> bytes:
    return data.replace(b"CERTIFICATE REQUEST", label)


def cases() -> dict[str, tuple[Callable[[], bytes], str]]:
    """file name -> (maker, the reason code it must be refused with)."""
    good = csr()
    return {
        "wrong-signature.der": (wrong_signature, "bad-signature"),
        "other-key-signature.der": (other_key_signature, "bad-signature"),
        "rsa-1024.pem": (
            lambda: pem(csr(key=rsa.generate_private_key(65537, 1024))),  # noqa: S505
            "weak-key",
        ),
        "rsa-8192.der": (
            lambda: der(csr(key=rsa.generate_private_key(65537, 8192))),
            "unsupported-key",
        ),
        "p192.pem": (lambda: pem(csr(key=ec.generate_private_key(ec.SECP192R1()))), "weak-key"),
        "p521.pem": (
            lambda: pem(csr(key=ec.generate_private_key(ec.SECP521R1()))),
            "unsupported-key",
        ),
        "secp256k1.pem": (
            lambda: pem(csr(key=ec.generate_private_key(ec.SECP256K1()))),
            "unsupported-key",
        ),
        "ed25519.pem": (
            lambda: pem(csr(key=ed25519.Ed25519PrivateKey.generate())),
            "unsupported-key",
        ),
        "ed448.der": (lambda: der(csr(key=ed448.Ed448PrivateKey.generate())), "unsupported-key"),
        "dsa-2048.pem": (lambda: pem(csr(key=dsa.generate_private_key(2048))), "unsupported-key"),
        "sha1-signed.der": (sha1_signed, "weak-signature"),
        "sha224-signed.der": (lambda: der(csr(alg=hashes.SHA224())), "weak-signature"),
        "ca-true.pem": (
            lambda: pem(csr(exts=[(x509.BasicConstraints(ca=True, path_length=None), True)])),
            "ca-requested",
        ),
        "ca-true-noncritical.der": (
            lambda: der(csr(exts=[(x509.BasicConstraints(ca=True, path_length=0), False)])),
            "ca-requested",
        ),
        "nested-extension.der": (nested_extension, "malformed-csr"),
        "huge-extension.der": (huge_extension, "extension-too-large"),
        "too-large.der": (too_large, "csr-too-large"),
        "many-extensions.der": (many_extensions, "malformed-csr"),
        "nul-in-cn.der": (lambda: der(csr(name=subject(cn="hostile-1\x00evil"))), "bad-subject"),
        "newline-in-cn.pem": (
            lambda: pem(csr(name=subject(cn="hostile-1\nCN=admin"))),
            "bad-subject",
        ),
        "escape-in-cn.pem": (lambda: pem(csr(name=subject(cn="hostile-1\x1b[31m"))), "bad-subject"),
        "del-in-cn.der": (lambda: der(csr(name=subject(cn="hostile\x7f1"))), "bad-subject"),
        "overlong-cn.der": (lambda: raw_name_csr(name_der(0x0C, b"h" * 1000)), "bad-subject"),
        "cn-65-chars.der": (lambda: raw_name_csr(name_der(0x0C, b"h" * 65)), "bad-subject"),
        "bad-utf8-cn.der": (
            lambda: raw_name_csr(name_der(0x0C, b"hostile-\xff\xfe1")),
            "malformed-csr",
        ),
        "bmp-odd-cn.der": (
            lambda: raw_name_csr(name_der(0x1E, b"\x00h\x00o\x00")),
            "malformed-csr",
        ),
        "subject-mismatch.pem": (lambda: pem(csr(name=subject(O="evil"))), "subject-mismatch"),
        "unknown-curve.der": (unknown_curve, "unsupported-key"),
        "version-2.der": (version_2, "malformed-csr"),
        "version-2.pem": (lambda: pem_of(version_2()), "malformed-csr"),
        "der-trailing-garbage.der": (lambda: der(good) + b"\x00garbage", "malformed-csr"),
        "der-trailing-zero.der": (lambda: der(good) + b"\x00", "malformed-csr"),
        "der-truncated.der": (lambda: der(good)[: len(der(good)) // 2], "malformed-csr"),
        "der-truncated-one.der": (lambda: der(good)[:-1], "malformed-csr"),
        "der-long-length.der": (
            lambda: b"\x30\x84\x7f\xff\xff\xff" + der(good)[2:],
            "malformed-csr",
        ),
        "pem-two-blocks.pem": (lambda: pem(good) + pem(csr()), "malformed-csr"),
        "pem-same-block-twice.pem": (lambda: pem(good) + pem(good), "malformed-csr"),
        "pem-truncated.pem": (lambda: pem(good)[:-40], "malformed-csr"),
        "pem-bad-base64.pem": (
            lambda: pem(good).replace(pem(good).splitlines()[1], b"!!!!not*base64!!!!"),
            "malformed-csr",
        ),
        "pem-wrong-label.pem": (lambda: relabel(pem(good), b"PUBLIC KEY"), "malformed-csr"),
        "pem-private-key.pem": (
            lambda: p256().private_bytes(
                PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "malformed-csr",
        ),
        "pem-garbage-after.pem": (lambda: pem(good) + b"\xff\xfe garbage \x00", "malformed-csr"),
        "pem-cert-and-csr.pem": (lambda: self_signed_cert() + pem(good), "malformed-csr"),
        "certificate.pem": (self_signed_cert, "malformed-csr"),
        "certificate.der": (
            lambda: x509.load_pem_x509_certificate(self_signed_cert()).public_bytes(DER),
            "malformed-csr",
        ),
        "non-utf8.bin": (lambda: bytes(range(128, 256)) * 4, "malformed-csr"),
        "empty.bin": (lambda: b"", "malformed-csr"),
        "whitespace.bin": (lambda: b" \n\t\r\n ", "malformed-csr"),
        "nul-bytes.bin": (lambda: b"\x00" * 64, "malformed-csr"),
        "lone-begin.pem": (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\n", "malformed-csr"),
        "json-looking.bin": (lambda: b'{"csr": "x"}', "malformed-csr"),
        "utf16-pem.pem": (lambda: pem(good).decode().encode("utf-16"), "malformed-csr"),
    }


def main() -> None:
    expected = {}
    for file_name, (make, code) in cases().items():
        (HERE / file_name).write_bytes(make())
        expected[file_name] = code
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(expected)} hostile CSRs to {HERE}")


if __name__ == "__main__":
    main()
