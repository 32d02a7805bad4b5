"""One board through the line: steps 2 to 7 of the design, each recorded in the ledger.

A failure at any step ends the board ``failed`` with a reason code (the
protocol's errors become ``serial-timeout``, ``serial-crc``, ``board-error``,
``disconnected`` ...; the ledger's refusals keep their own codes) and the
board can be retried by plugging it in again. A board the ledger already has
as verified is skipped, never given a second identity.

A board is refused before anything is recorded when its HELLO reports an id
the device-id policy refuses (``bad-device-id``) or an id another port of this
station is provisioning (``duplicate-id``). A refusal saying the device is
another run's (``NOT_OURS``) is reported on the port, never recorded on the
device. The board is asked who it is (STATUS) right before its chain is
written and right before it is verified; another board there ends the run
``board-changed``, with no chain written to it and nothing whitelisted.

A run that fails after it asked the board for its key (GEN_KEY_CSR or
PUT_SECURE_KEY) ends with ABORT, and the board wipes what this session made;
a run that fails before (a refused id, a board offering another key mode, the
ledger not enrolling it) sends none: it made nothing on the board, and an ABORT
would reach what an earlier session made (see ``abort_session``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from firmware_hooks.host import SE_KEY_NAME_MAX, BoardClient, BoardHello
from firmware_hooks.protocol import (
    BoardError,
    Disconnected,
    MsgType,
    ProtocolError,
    Timeout,
)
from station import policy
from station.ca import CertificateAuthority
from station.errors import NotFoundError, StationError
from station.ledger import Batch, DeviceState, KeyMode, Ledger
from station.madekeys import new_rsa_key, wipe

log = logging.getLogger(__name__)

NONCE_BYTES = 32
_KEY_NAME_OK = re.compile(r"\A[A-Za-z0-9._-]{1,20}\Z")  # not "$": no trailing newline

# Steps a board goes through, as shown on the status board.
STEP_HELLO = "hello"
STEP_KEY = "key"
STEP_ISSUE = "issue"
STEP_CHAIN = "chain"
STEP_PROVE = "prove"


# Refusals that say the device is another run's (another port, another station):
# recorded on the port, never on the device, whose record is not this run's to change.
# (A verified board that "fails" leaves the whitelist: a second board claiming its id
# must not do that to it.) Not duplicate-key: the key this board made is another
# device's, which is this board's own failure (a weak random generator), recorded.
NOT_OURS = frozenset(
    {
        "duplicate-id",  # the same hardware id is on another port of this station
        "already-provisioned",  # verified meanwhile, by another run
        "already-verified",
        "issuance-in-progress",  # another run holds the issuance intent
        "intent-resolved",  # another process resolved this run's intent
        "bad-state",  # the device moved under this run: another run moved it
        "ledger-conflict",  # concurrent writers on the device
    }
)


class DeviceClaims:
    """The hardware ids being provisioned on this station's ports right now: two boards
    reporting the same id on two ports are not both run against one ledger record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[str] = set()

    def claim(self, device_id: str) -> bool:
        with self._lock:
            if device_id in self._held:
                return False
            self._held.add(device_id)
            return True

    def release(self, device_id: str) -> None:
        with self._lock:
            self._held.discard(device_id)


@dataclass(frozen=True)
class ProvisionContext:
    """What every port shares: the ledger (one engine for all threads), the CA, the batch,
    and the hardware ids in progress on its ports."""

    ledger: Ledger
    ca: CertificateAuthority
    batch: Batch
    claims: DeviceClaims = field(default_factory=DeviceClaims, compare=False)
    # Renew verified boards instead of skipping them (station.line.renew).
    renew: bool = False


@dataclass(frozen=True)
class Outcome:
    device_id: str
    result: str  # verified | failed | skipped
    code: str = ""  # reason code when failed or skipped
    message: str = ""
    serial: str | None = None  # lowercase hex, as the whitelist spells it
    reused: bool = False  # the ledger handed back the certificate the board already had
    renews: str | None = None  # the serial a field renewal superseded


def failure_code(exc: BaseException) -> str:
    """The reason code recorded for an exception raised while provisioning: the
    ``code`` every station and serial-protocol error carries, ``bad-proof`` for a
    signature that does not verify, ``disconnected`` for an OS error on the port."""
    if isinstance(exc, StationError | ProtocolError):
        return exc.code
    if isinstance(exc, InvalidSignature):
        return "bad-proof"
    if isinstance(exc, OSError):
        return "disconnected"
    return "internal"


# What each request does, in an operator's words.
_DOING: dict[int, str] = {
    MsgType.HELLO: "hello",
    MsgType.GEN_KEY_CSR: "key generation",
    MsgType.PUT_SECURE_KEY: "loading its key into the Secure Element",
    MsgType.PUT_CHAIN: "storing its certificate chain",
    MsgType.PROVE: "the proof of possession",
    MsgType.STATUS: "the status question",
    MsgType.ABORT: "abort",
    MsgType.RENEW_KEY_CSR: "making its renewal key",
    MsgType.RENEW_COMMIT: "committing its renewal",
}


def operator_message(exc: BaseException) -> str:
    """The failure in words an operator can act on, without the reason code (shown
    beside it) and without protocol detail (sequence numbers, COBS offsets: logged)."""
    if isinstance(exc, StationError):
        return exc.message
    if isinstance(exc, Timeout):
        doing = _DOING.get(exc.msg_type or 0, "a request")
        tries = f", {exc.attempts} tries" if exc.attempts else ""
        noisy = " (damaged frames: a noisy line)" if exc.code == "serial-crc" else ""
        return f"board did not answer {doing}{tries}{noisy}: check the cable and the board"
    if isinstance(exc, Disconnected):
        return "the port went away: check the USB cable and the adapter"
    if isinstance(exc, BoardError):
        return f"the board refused: {exc.message or f'error {exc.error_code}'}"
    if isinstance(exc, InvalidSignature):
        return "the board's proof of possession does not verify with its certificate"
    return str(exc) or type(exc).__name__


def se_key_name(device_id: str) -> str:
    """The Secure Element key name for a board: its id when it fits (at most 20
    characters of [A-Za-z0-9._-]), else a prefix and a hash of the id."""
    if _KEY_NAME_OK.fullmatch(device_id):
        return device_id
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", device_id)[:11]
    name = f"{safe}-{hashlib.sha256(device_id.encode()).hexdigest()[:8]}"
    assert len(name) <= SE_KEY_NAME_MAX
    return name


_T = TypeVar("_T")
_OVERLAP_WORKERS = 8
_overlap_pool: ThreadPoolExecutor | None = None
_overlap_lock = threading.Lock()


def _overlap(call: Callable[..., _T], *args: Any) -> Future[_T]:
    """Run a ledger call beside the serial line instead of after it.

    The wire is the slow part of a board (a chain is ~125 ms at 115200 baud);
    ledger writes that do not depend on the board's next answer run meanwhile.
    A pool shared by every port: a thread started per call costs its start-up
    handshake (milliseconds when the GIL is busy) on the board's critical path."""
    global _overlap_pool
    with _overlap_lock:
        if _overlap_pool is None:
            _overlap_pool = ThreadPoolExecutor(
                _OVERLAP_WORKERS, thread_name_prefix="ledger-overlap"
            )
    return _overlap_pool.submit(call, *args)


def see_rsa_csr(client: BoardClient, device_id: str, subject: x509.Name) -> bytes:
    """see-rsa: make RSA-2048 here, load it into the board's Secure Element, build the
    CSR with it, then wipe the station's copy.

    What is wiped: the bytearray holding the DER, zeroed whatever happens; the
    key never touches the station's disk. What is NOT wiped (Python cannot
    overwrite immutable bytes, only drop them): the bytes ``private_bytes``
    returns, the ``bytes(der)`` handed to the client, and the copies the codec
    makes on the way to the wire (TLV, frames, COBS, the request's retry
    ``wire``, pyserial's own copy). They are freed, not cleared, and may stay in
    the process's memory until reused. The key object is dropped (OpenSSL clears
    its private numbers when it frees them).
    """
    key: rsa.RSAPrivateKey | None
    key, der = new_rsa_key(serialization.PrivateFormat.TraditionalOpenSSL)
    try:
        client.put_secure_key(se_key_name(device_id), bytes(der))
        csr = (
            x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.DER)
    finally:
        wipe(der)
        del der
        key = None


def board_label(hardware_id: str) -> str:
    """How a hardware id the policy refuses is shown and reported: quoted, escaped
    (``repr``) and cut short, never the board's raw text."""
    shown = repr(hardware_id[:40])
    return shown + "..." if len(hardware_id) > 40 else shown


def refuse_hello(hello: BoardHello) -> Outcome | None:
    """The refusal of a board whose HELLO reports a hardware id the ledger's device-id
    policy refuses (``bad-device-id``), or None when the id is acceptable."""
    try:
        policy.check_device_id(hello.hardware_id)
    except StationError as exc:
        label = board_label(hello.hardware_id)
        return Outcome(
            label, "failed", exc.code, f"the board reports hardware id {label}: {exc.message}"
        )
    return None


def provision_board(
    client: BoardClient,
    hello: BoardHello,
    ctx: ProvisionContext,
    report: Callable[[str], None] = lambda step: None,
    on_issued: Callable[[], None] = lambda: None,
) -> Outcome:
    """Steps 3 to 7 for the board that answered ``hello``; never raises for a board's fault."""
    refused = refuse_hello(hello)
    if refused is not None:
        return refused
    device_id = hello.hardware_id
    if not ctx.claims.claim(device_id):
        message = (
            f"hardware id {device_id} is being provisioned on another port right now; "
            "two boards report the same id"
        )
        log.warning("%s: %s", device_id, message)
        return Outcome(device_id, "failed", "duplicate-id", message)
    try:
        return _provision_claimed(client, hello, ctx, device_id, report, on_issued)
    finally:
        ctx.claims.release(device_id)


def _provision_claimed(
    client: BoardClient,
    hello: BoardHello,
    ctx: ProvisionContext,
    device_id: str,
    report: Callable[[str], None],
    on_issued: Callable[[], None],
) -> Outcome:
    ledger, batch = ctx.ledger, ctx.batch
    try:
        existing = ledger.get_device(device_id)
    except NotFoundError:
        existing = None
    if existing is not None and existing.state == DeviceState.REVOKED.value:
        # Refused on this channel as on every other (station.ledger.revocation); nothing
        # is recorded on the board, which stays revoked.
        message = f"revoked (serial {existing.serial or '-'}); only an operator re-provisions it"
        log.warning("%s: %s", device_id, message)
        return Outcome(device_id, "failed", "device-revoked", message)
    if existing is not None and existing.state == DeviceState.VERIFIED.value:
        if ctx.renew:
            from station.line.renew import renew_board  # it builds on this module

            return renew_board(client, hello, ctx, existing, report)
        where = "" if existing.batch == batch.name else f" in batch {existing.batch}"
        message = f"already verified{where} with serial {existing.serial}; not re-provisioned"
        log.info("%s: %s", device_id, message)
        return Outcome(device_id, "skipped", "already-verified", message, existing.serial)

    try:
        ledger.register_device(batch.name, device_id)
    except StationError as exc:
        # Not enrolled here (another batch's live certificate, a full batch ...):
        # the ledger keeps its record of the board untouched.
        return Outcome(device_id, "failed", exc.code, exc.message)

    session = BoardSession()
    try:
        return _steps(
            client, hello, ctx, device_id, existing is not None, session, report, on_issued
        )
    except Exception as exc:  # every failure is recorded with its reason
        code = failure_code(exc)
        message = operator_message(exc)[:2000]
        if code == "internal":
            log.exception("%s: unexpected error", device_id)
        elif isinstance(exc, ProtocolError):
            log.info("%s: %s (%s)", device_id, code, exc)  # the protocol detail
        if code in NOT_OURS:
            # Another run's device: this board's failure is reported on its port only.
            log.warning("%s: refused, not recorded on the device: %s %s", device_id, code, message)
        else:
            _record_failure(ledger, device_id, code, message)
        abort_session(client, device_id, code, session)
        return Outcome(device_id, "failed", code, message)


@dataclass
class BoardSession:
    """What this run has asked of the board on its port."""

    # GEN_KEY_CSR, PUT_SECURE_KEY or RENEW_KEY_CSR was sent (answered or not): from
    # then on the board may hold a key, and later a chain, that this session made.
    key_requested: bool = False


def abort_session(client: BoardClient, device_id: str, code: str, session: BoardSession) -> None:
    """Tell the board its session failed (ABORT): it wipes the key and the chain this
    session made, so no board leaves the line holding a key or a chain whose
    certificate is not whitelisted.

    Only once the key was asked for: before that this session made nothing on the
    board, and the board's key and chain (if any) are an earlier session's, perhaps
    a verified one (the board keeps them across its HELLO; its ABORT wipes only what
    came after). That holds whatever the code, NOT_OURS included: after the key
    command, the key on the board is this session's (it replaced any earlier one).
    Not sent to a board gone from the port (``disconnected``: it cannot be told) nor
    to another board (``board-changed``: not this session's board). The ABORT
    carries ``EXPECTED_ID`` like every command after HELLO (``BoardClient``), so a
    board swapped in meanwhile refuses it (WRONG_BOARD) and keeps what it holds.
    Best effort: a failed ABORT is logged."""
    if not session.key_requested or code in ("disconnected", "board-changed"):
        return
    try:
        client.abort()
    except ProtocolError as exc:
        log.warning("%s: could not abort the failed session: %s", device_id, exc)


def _record_failure(ledger: Ledger, device_id: str, code: str, message: str) -> None:
    try:
        ledger.mark_failed(device_id, code, message)
    except StationError:
        log.exception("%s: could not record failure %s", device_id, code)


def check_same_board(
    client: BoardClient,
    device_id: str,
    chain_sha256: str | None = None,
    *,
    chain_item: str = "chain_sha256",
) -> dict[str, str]:
    """The board on the port is still ``device_id`` (STATUS; never HELLO, which a
    simulated line takes as "next board"), and holds the chain of hex SHA-256
    ``chain_sha256`` when given (STATUS item ``chain_item``: ``renewal_chain_sha256``
    during a renewal). Raises ``board-changed`` otherwise: the board was swapped on
    the port since its HELLO. Returns the STATUS items."""
    status = client.status()
    reported = status.get("hardware_id", "")
    if reported != device_id:
        raise StationError(
            f"the board on the port now reports hardware id {board_label(reported)}, "
            f"not {device_id}: boards swapped mid-flow",
            code="board-changed",
        )
    if chain_sha256 is not None and status.get(chain_item, "").lower() != chain_sha256:
        raise StationError(
            f"the board {device_id} no longer holds the chain it stored: boards swapped mid-flow",
            code="board-changed",
        )
    return status


def _steps(
    client: BoardClient,
    hello: BoardHello,
    ctx: ProvisionContext,
    device_id: str,
    known: bool,
    session: BoardSession,
    report: Callable[[str], None],
    on_issued: Callable[[], None],
) -> Outcome:
    ledger, batch = ctx.ledger, ctx.batch
    mode = KeyMode(batch.key_mode)
    if mode.value not in hello.capabilities:
        raise StationError(
            f"the board offers {', '.join(sorted(hello.capabilities))}, the batch needs {mode}",
            code="unsupported-mode",
        )
    if known:
        current = ledger.get_device(device_id)
        if current.state in (DeviceState.ISSUED.value, DeviceState.INSTALLED.value):
            # Left mid-way by an earlier run: record that before starting again.
            ledger.mark_failed(device_id, "interrupted", "plugged again before it was verified")

    # 3. key
    report(STEP_KEY)
    subject = policy.subject_from_template(batch.subject_template, device_id)
    session.key_requested = True
    if mode is KeyMode.BOARD_ECC:
        csr_der = client.generate_key_csr(policy.format_subject(subject))
    else:
        csr_der = see_rsa_csr(client, device_id, subject)
    ledger.mark_key_ready(device_id, batch=batch.name)

    # 4. issue: policy, intent, HSM signature, commit. The board is not verified
    # here, so a fresh key replaces any certificate it got on an earlier attempt.
    report(STEP_ISSUE)
    issued = ledger.issue(batch.name, device_id, csr_der, ctx.ca, reprovision=True)
    on_issued()
    serial = format(issued.serial, "x")

    # 5. chain, checked against what the station sent; the single-use challenge for
    # step 6 is made in the ledger while the chain is on the wire. The board is asked
    # who it is first: a board swapped in since HELLO never gets this chain.
    report(STEP_CHAIN)
    expected = hashlib.sha256(issued.chain_pem).digest()
    challenge = _overlap(ledger.create_challenge, device_id)
    try:
        check_same_board(client, device_id)
        digest = client.put_chain(issued.chain_pem)
    finally:
        wait([challenge])
    if digest != expected:
        message = f"board stored sha256 {digest.hex()}, the station sent {expected.hex()}"
        _record_failure(ledger, device_id, "chain-mismatch", message)
        abort_session(client, device_id, "chain-mismatch", session)
        return Outcome(device_id, "failed", "chain-mismatch", message, serial)
    nonce = challenge.result()

    # 6. proof of possession; the ledger records the installed chain while the board
    # signs, and has it committed before the proof is checked. 7. verified + whitelisted
    # Before the board is whitelisted: the one on the port is still it, with this chain.
    report(STEP_PROVE)
    installed = _overlap(ledger.mark_installed, device_id, digest.hex())
    try:
        signature = client.prove(device_id, nonce)
        check_same_board(client, device_id, digest.hex())
    finally:
        wait([installed])
    installed.result()
    ledger.verify_proof(device_id, nonce, signature)
    return Outcome(device_id, "verified", serial=serial, reused=issued.reused)
