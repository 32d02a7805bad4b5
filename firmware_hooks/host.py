"""Host side of the serial line: ``BoardClient``, what the station's line driver uses.

One client talks to one board over one port, one request at a time::

    with BoardClient.open("/dev/ttyACM0") as board:
        hello = board.hello()
        csr_der = board.generate_key_csr("/O=company/OU=team/CN=dev-0001/C=US")
        ...  # check the CSR, issue the certificate
        digest = board.put_chain(cert_pem + ca_pem)   # == sha256(cert_pem + ca_pem)
        signature = board.prove(hello.hardware_id, nonce)   # nonce: 32 fresh bytes

Every failure is a ``ProtocolError`` subclass: ``BoardError`` (the board
refused, with an ``ErrorCode``), ``Timeout`` (after the bounded retries),
``UnexpectedReply``, ``UnsupportedVersion``, ``Disconnected``.

Verifying the proof of possession (on the station, with ``cryptography``)::

    signed = proof_message(hello.hardware_id, nonce)    # what the board signed
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):      # board-ecc, P-256
        key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))   # DER (r, s)
    else:                                               # see-rsa, RSA-2048
        key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())

``verify`` raises ``InvalidSignature`` when the board does not hold the key.
The nonce must be 32 fresh random bytes.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from firmware_hooks.link import Link, SerialLike
from firmware_hooks.protocol import (
    PROTOCOL_V2,
    PROTOCOL_V3,
    PROTOCOL_VERSION,
    MsgType,
    Tag,
    encode_tlv,
    proof_message,
)
from firmware_hooks.protocol import (
    Fields as _Fields,
)

SE_RSA_2048 = 4097  # ARTIK SE algorithm id 0x1001
SE_KEY_NAME_MAX = 20

DEFAULT_TIMEOUTS: Mapping[MsgType, float] = types.MappingProxyType(
    {
        MsgType.HELLO: 2.0,
        MsgType.STATUS: 2.0,
        MsgType.ABORT: 2.0,
        MsgType.GEN_KEY_CSR: 20.0,  # key generation on a board's CPU
        MsgType.PUT_SECURE_KEY: 20.0,
        MsgType.PUT_CHAIN: 5.0,
        MsgType.PROVE: 10.0,
        MsgType.RENEW_KEY_CSR: 20.0,
        MsgType.RENEW_COMMIT: 5.0,
    }
)
DEFAULT_RETRIES = 2


@dataclass(frozen=True)
class BoardHello:
    """A board's answer to HELLO."""

    hardware_id: str
    agent_version: str
    capabilities: frozenset[str]
    protocol_version: int = PROTOCOL_VERSION  # what the rest of the session is sent in


class BoardClient:
    """Commands to one board over a pyserial-like port.

    ``timeouts`` overrides the per-command defaults (seconds, per attempt;
    the line time of the request at ``baudrate`` is added). ``retries`` is the
    number of extra attempts after a timeout; they are safe for every command
    because the board answers a repeated sequence number from its replay cache.
    """

    def __init__(
        self,
        port: SerialLike,
        *,
        timeouts: Mapping[MsgType, float] | None = None,
        retries: int = DEFAULT_RETRIES,
        baudrate: int | None = None,
        protocol_versions: tuple[int, ...] = (PROTOCOL_VERSION, PROTOCOL_V2, PROTOCOL_V3),
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.protocol_versions = protocol_versions
        # The hardware id of the last HELLO, sent with every later command (EXPECTED_ID).
        self.expected_id: str | None = None
        self.port = port
        self.timeouts: dict[MsgType, float] = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
        self.retries = retries
        self.link = Link(port, baudrate=baudrate)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        baudrate: int = 115200,
        timeouts: Mapping[MsgType, float] | None = None,
        retries: int = DEFAULT_RETRIES,
        wrap: Callable[[Any], Any] | None = None,
        protocol_versions: tuple[int, ...] = (PROTOCOL_VERSION, PROTOCOL_V2, PROTOCOL_V3),
    ) -> BoardClient:
        """Open a device path (``/dev/ttyACM0``, a pty) or a pyserial URL (``loop://``).

        ``wrap`` wraps the opened port (the line counts its bytes that way)."""
        import serial  # pyserial; imported here so the codec stays importable without it

        port = serial.serial_for_url(url, baudrate=baudrate, timeout=0.05)
        if wrap is not None:
            port = wrap(port)
        return cls(
            port,
            timeouts=timeouts,
            retries=retries,
            baudrate=baudrate,
            protocol_versions=protocol_versions,
        )

    def close(self) -> None:
        self.port.close()

    def __enter__(self) -> BoardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, msg_type: MsgType, fields: list[tuple[int, bytes | str | int]]) -> _Fields:
        if self.expected_id is not None:
            # The board refuses a command meant for another (WRONG_BOARD): a board
            # swapped in since HELLO is never given a key, a chain or an ABORT.
            fields = [(Tag.EXPECTED_ID, self.expected_id), *fields]
        reply = self.link.request(
            msg_type,
            encode_tlv(fields),
            timeout=self.timeouts[msg_type],
            retries=self.retries,
        )
        return _Fields.decode(reply.payload)

    # ------------------------------------------------------------------ commands

    def hello(self) -> BoardHello:
        """Who is on this port: hardware id, agent version, capabilities
        (``board-ecc``, ``see-rsa``, ...). Always sent in version 1 frames, offering
        the versions this client speaks; the board's choice (version 1 when it names
        none) is what the following requests are sent in."""
        offer: list[tuple[int, bytes | str | int]] = [
            (Tag.PROTOCOL_VERSIONS, v) for v in self.protocol_versions if v != PROTOCOL_VERSION
        ]
        self.link.start_session()
        reply = self.link.request(
            MsgType.HELLO,
            encode_tlv(offer),
            timeout=self.timeouts[MsgType.HELLO],
            retries=self.retries,
            version=PROTOCOL_VERSION,
        )
        fields = _Fields.decode(reply.payload)
        chosen = fields.get_u16(Tag.PROTOCOL_VERSION, PROTOCOL_VERSION)
        self.link.version = chosen if chosen in self.protocol_versions else PROTOCOL_VERSION
        self.expected_id = fields.get_str(Tag.HARDWARE_ID)
        return BoardHello(
            hardware_id=fields.get_str(Tag.HARDWARE_ID),
            agent_version=fields.get_str(Tag.AGENT_VERSION),
            capabilities=frozenset(fields.get_all_str(Tag.CAPABILITY)),
            protocol_version=self.link.version,
        )

    def generate_key_csr(self, subject: str, key_name: str | None = None) -> bytes:
        """board-ecc: the board makes a P-256 key (which never leaves it) and returns
        a CSR in DER for ``subject`` (OpenSSL style: ``/O=company/OU=team/CN=dev-0001/C=US``).
        ``key_name`` names the key file on the board (default ``deviceCert``)."""
        fields: list[tuple[int, bytes | str | int]] = [(Tag.SUBJECT, subject)]
        if key_name is not None:
            fields.append((Tag.KEY_NAME, key_name))
        return self._call(MsgType.GEN_KEY_CSR, fields).get_bytes(Tag.CSR)

    def put_secure_key(
        self, key_name: str, key_der: bytes, *, algorithm: int = SE_RSA_2048
    ) -> None:
        """see-rsa: load a private key (DER; RSA-2048 by default) into the board's
        Secure Element under ``key_name`` (at most 20 characters) with see_test.
        The board deletes its temporary copy whatever happens; the station should
        wipe its own once this returns."""
        self._call(
            MsgType.PUT_SECURE_KEY,
            [(Tag.KEY_NAME, key_name), (Tag.KEY_DER, key_der), (Tag.ALGORITHM, algorithm)],
        )

    def put_chain(self, chain_pem: bytes) -> bytes:
        """Store the certificate chain (device certificate then CA, PEM) as
        ``deviceCertAndCACert.crt``; returns the SHA-256 the board computed over
        the bytes it stored (compare with ``hashlib.sha256(chain_pem).digest()``)."""
        return self._call(MsgType.PUT_CHAIN, [(Tag.CHAIN, chain_pem)]).get_bytes(Tag.DIGEST)

    def prove(self, device_id: str, nonce: bytes) -> bytes:
        """Have the board sign the proof message for ``device_id`` and the 32-byte
        ``nonce`` (``protocol.proof_message``) with its installed key: ECDSA-SHA256
        (DER) for board-ecc, PKCS#1 v1.5 SHA-256 for see-rsa. See the module
        docstring for the verification."""
        message = proof_message(device_id, nonce)
        return self._call(MsgType.PROVE, [(Tag.NONCE, message)]).get_bytes(Tag.SIGNATURE)

    def status(self) -> dict[str, str]:
        """The board's provisioning state: ``state`` (idle, key-ready, chain-stored,
        renewing), ``key_mode``, ``key_name``, ``chain_sha256`` (hex), ``renewal_chain_sha256``
        (hex, a renewal's chain), ``hardware_id``, ``agent_version``, ``protocol_version``
        (the version this session speaks)."""
        fields = self._call(MsgType.STATUS, [])
        result: dict[str, str] = {}
        for item in fields.get_all_str(Tag.STATUS_ITEM):
            key, _, value = item.partition("=")
            result[key] = value
        return result

    def renew_key_csr(self, subject: str) -> bytes:
        """Field renewal (capability ``renew``): the board makes a new P-256 key beside
        its live one and returns a CSR (DER) for ``subject``. Its PUT_CHAIN and PROVE
        then work on the renewal until :meth:`renew_commit` (or ABORT, which drops it)."""
        return self._call(MsgType.RENEW_KEY_CSR, [(Tag.SUBJECT, subject)]).get_bytes(Tag.CSR)

    def renew_commit(self) -> bytes:
        """The renewal's key and chain replace the live ones; returns the SHA-256 of
        the chain the board now holds."""
        return self._call(MsgType.RENEW_COMMIT, []).get_bytes(Tag.DIGEST)

    def abort(self) -> None:
        """Drop the provisioning session in progress on the board (see the spec)."""
        self._call(MsgType.ABORT, [])
