"""Field renewal over the serial line (``station line run --renew``).

A verified board plugged into a line run with ``--renew`` gets a new key and
certificate while its old ones stay live until the new ones are proven:

1. refusals before the board is asked for anything, nothing recorded on the
   device and nothing sent to the board: an agent without the ``renew``
   capability (``renewal-unsupported``, as from agent 1.0.0), a ``see-rsa``
   board (``renewal-unsupported``: its key lives in the Secure Element under one
   name, which a renewal beside it would need a second of), a board whose stored
   chain is not the live certificate's (``renewal-chain-unknown``: the ledger
   cannot tell this board holds the identity it would renew), a board of another
   batch than the line's (``renewal-other-batch``, as EST and CMP refuse it);
   then PROVE with the live key: the chain is public data (the certificate and the
   CA chain), so a board that names another's hardware id and reports that chain's
   digest must still sign a fresh nonce with the live certificate's key
   (``renewal-not-holder`` otherwise);
2. RENEW_KEY_CSR: the board makes a new key beside its live one;
3. the one issuance path with ``renews=<old serial>``, confirmation deferred:
   the new certificate is issued, not whitelisted; the old one stays
   ``renewing`` and whitelisted (station.ledger.succession);
4. STATUS, PUT_CHAIN of the new chain (stored beside the live one), PROVE with
   the new key, STATUS (the renewal's chain is the one sent);
5. the ledger checks the proof with the new certificate and only then confirms:
   the old certificate is superseded, the whitelist moves to the new serial;
6. RENEW_COMMIT: the board puts the new key and chain in place of the old.

A failure in 2-5 abandons the renewal (but a confirmation the ledger wrote and then
reported as failed, a disk sync or a connection lost at COMMIT, is read back and
committed: the ledger whitelists only the new certificate by then): the new
certificate is revoked (it left the station; CRL and OCSP say so), the old is live
again, the device stays verified (it is a working field device: never marked
failed), and ABORT makes the board wipe only what the renewal made. A commit the
board did not answer after step 5 (``renewal-not-committed``) is finished the next
time the board is plugged into a ``--renew`` run: its STATUS shows the renewal's
chain, the one the ledger confirmed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from firmware_hooks.host import BoardClient, BoardHello
from firmware_hooks.protocol import ProtocolError
from station import policy
from station.errors import StationError
from station.ledger import Device, DeviceState, KeyMode
from station.ledger.proof import new_nonce, signature_ok, signed_message
from station.line.provision import (
    STEP_CHAIN,
    STEP_ISSUE,
    STEP_KEY,
    STEP_PROVE,
    BoardSession,
    Outcome,
    ProvisionContext,
    abort_session,
    check_same_board,
    failure_code,
    operator_message,
)

log = logging.getLogger(__name__)

RENEW_CAPABILITY = "renew"


def renew_board(
    client: BoardClient,
    hello: BoardHello,
    ctx: ProvisionContext,
    device: Device,
    report: Callable[[str], None] = lambda step: None,
) -> Outcome:
    """Renew the verified board ``device``; never raises for a board's fault."""
    device_id = device.device_id
    if RENEW_CAPABILITY not in hello.capabilities:
        message = (
            f"the board's agent {hello.agent_version[:40]!r} cannot renew (no '{RENEW_CAPABILITY}' "
            f"capability); certificate {device.serial} stays live"
        )
        return Outcome(device_id, "skipped", "renewal-unsupported", message, device.serial)
    if device.batch != ctx.batch.name:
        message = (
            f"the board belongs to batch {device.batch}, this line runs {ctx.batch.name}: "
            f"not renewed here; certificate {device.serial} stays live"
        )
        return Outcome(device_id, "skipped", "renewal-other-batch", message, device.serial)
    batch = ctx.ledger.get_batch(device.batch)
    if batch.key_mode != KeyMode.BOARD_ECC.value:
        message = (
            f"batch {batch.name} is {batch.key_mode}: a Secure Element key is not renewed "
            f"over the line; certificate {device.serial} stays live"
        )
        return Outcome(device_id, "skipped", "renewal-unsupported", message, device.serial)
    try:
        return _renew(client, ctx, device, batch.subject_template, report)
    except Exception as exc:  # before anything was recorded or asked of the board
        code = failure_code(exc)
        if code == "internal":
            log.exception("%s: unexpected error", device_id)
        return Outcome(device_id, "failed", code, operator_message(exc)[:2000], device.serial)


def _renew(
    client: BoardClient,
    ctx: ProvisionContext,
    device: Device,
    template: str,
    report: Callable[[str], None],
) -> Outcome:
    ledger, device_id = ctx.ledger, device.device_id
    status = check_same_board(client, device_id)
    pending = ledger.renewals.pending(device_id)
    live_serial = pending.old_serial if pending is not None else device.serial
    if live_serial is None:
        # An intent is open: another run is signing for this board, or a crash left it.
        message = (
            f"a certificate for {device_id} is being signed or a crash left its intent: "
            "run `station recover`, then plug the board into a --renew run again"
        )
        return Outcome(device_id, "failed", "issuance-in-progress", message)
    renewal_chain = status.get("renewal_chain_sha256", "").lower()
    if pending is None and renewal_chain and renewal_chain == (device.chain_sha256 or ""):
        # The ledger confirmed this renewal in an earlier run; its commit never reached
        # the board (renewal-not-committed): finish it.
        return _commit(client, device_id, device.serial, None, renewal_chain)
    live_cert = ledger.certificate(live_serial)
    known = {device.chain_sha256 or ""}  # what it reported when it was provisioned here
    if live_cert.pem is not None:  # or the live certificate and the CA chain (EST, CMP)
        known.add(hashlib.sha256(live_cert.pem.encode() + ctx.ca.chain_pem).hexdigest())
    if status.get("chain_sha256", "").lower() not in known - {""}:
        message = (
            f"the board does not hold the chain of its live certificate {live_serial}; "
            "not renewed (re-provision it if it lost its identity)"
        )
        return Outcome(device_id, "failed", "renewal-chain-unknown", message, live_serial)
    # The chain is public: the board proves it holds the live certificate's key.
    assert live_cert.pem is not None
    nonce = new_nonce()
    signature = client.prove(device_id, nonce)
    if not signature_ok(live_cert.pem, signed_message(device_id, nonce), signature):
        message = (
            f"the board does not hold the key of its live certificate {live_serial}: "
            "not renewed (a board claiming another's identity, or one that lost its key)"
        )
        return Outcome(device_id, "failed", "renewal-not-holder", message, live_serial)

    # 2. a new key beside the live one. From here a failure aborts the board's renewal.
    report(STEP_KEY)
    subject = policy.subject_from_template(template, device_id)
    new_serial: str | None = None
    proved: str | None = None  # the renewal chain, once the ledger was asked to confirm
    try:
        csr_der = client.renew_key_csr(policy.format_subject(subject))
        # 3. issued, not whitelisted: the old certificate stays live until the proof.
        report(STEP_ISSUE)
        issued = ledger.issue(
            device.batch, device_id, csr_der, ctx.ca, renews=live_serial, confirm_later=True
        )
        new_serial = format(issued.serial, "x")
        # 4. the new chain, beside the live one; the proof with the new key.
        report(STEP_CHAIN)
        expected = hashlib.sha256(issued.chain_pem).digest()
        check_same_board(client, device_id)
        digest = client.put_chain(issued.chain_pem)
        if digest != expected:
            raise StationError(
                f"board stored sha256 {digest.hex()}, the station sent {expected.hex()}",
                code="chain-mismatch",
            )
        nonce = ledger.renewals.challenge(device_id)
        report(STEP_PROVE)
        signature = client.prove(device_id, nonce)
        check_same_board(client, device_id, digest.hex(), chain_item="renewal_chain_sha256")
        # 5. the proof: old superseded, whitelist on the new serial.
        proved = digest.hex()
        ledger.renewals.prove(device_id, nonce, signature, chain_sha256=proved)
    except Exception as exc:
        if proved is not None and new_serial is not None:
            settled = _confirmed_anyway(ctx, device_id, new_serial)
            if settled is None:  # the ledger cannot say: leave the board as it is
                message = (
                    f"the ledger could not say whether renewal {new_serial} was confirmed "
                    f"({operator_message(exc)[:500]}): plug the board into a --renew run "
                    "again once the ledger is back"
                )
                return Outcome(device_id, "failed", failure_code(exc), message, live_serial)
            if settled:
                log.warning("%s: renewal confirmed despite %s: committing it", device_id, exc)
                return _commit(client, device_id, new_serial, live_serial, proved)
        return _abandon(client, ctx, device_id, new_serial, live_serial, exc)
    # 6. the board puts the new key and chain in place.
    return _commit(client, device_id, new_serial, live_serial, digest.hex())


def _confirmed_anyway(ctx: ProvisionContext, device_id: str, new_serial: str) -> bool | None:
    """After the confirmation raised: did it commit? (None: the ledger cannot say.)"""
    try:
        device = ctx.ledger.get_device(device_id)
        waiting = ctx.ledger.renewals.pending(device_id)
    except Exception:
        log.exception("%s: cannot read back renewal %s", device_id, new_serial)
        return None
    verified = device.state == DeviceState.VERIFIED.value
    return waiting is None and device.serial == new_serial and verified


def _abandon(
    client: BoardClient,
    ctx: ProvisionContext,
    device_id: str,
    new_serial: str | None,
    live_serial: str,
    exc: Exception,
) -> Outcome:
    """The renewal failed: its certificate revoked, the old one live, the board told."""
    code = failure_code(exc)
    message = operator_message(exc)[:2000]
    if code == "internal":
        log.exception("%s: unexpected error while renewing", device_id)
    elif isinstance(exc, ProtocolError):
        log.info("%s: %s (%s)", device_id, code, exc)
    if new_serial is not None:
        try:
            ctx.ledger.renewals.abandon(device_id, code, serial=new_serial)
        except StationError:
            log.exception("%s: could not abandon renewal %s", device_id, new_serial)
    # RENEW_KEY_CSR was sent: the board wipes only the renewal's key and chain.
    abort_session(client, device_id, code, BoardSession(key_requested=True))
    message = f"renewal failed, certificate {live_serial} stays live: {message}"
    return Outcome(device_id, "failed", code, message[:2000], live_serial)


def _committed_anyway(client: BoardClient, chain: str) -> bytes:
    """After an unanswered (or refused, BAD_STATE) RENEW_COMMIT: a board whose live
    chain is now the renewal's committed it, and only its answer was lost."""
    try:
        status = client.status()
    except ProtocolError:
        return b""
    committed = not status.get("renewal_chain_sha256") and status.get("chain_sha256") == chain
    return bytes.fromhex(chain) if committed else b""


def _commit(
    client: BoardClient, device_id: str, serial: str | None, old: str | None, chain: str
) -> Outcome:
    try:
        live = client.renew_commit()
    except ProtocolError as exc:
        log.warning("%s: renewal commit: %s", device_id, exc)
        live = _committed_anyway(client, chain)
    if live.hex() != chain:
        message = (
            f"the station confirmed the renewal (serial {serial}) but the board did not "
            "commit it: plug it into a line run with --renew again to finish"
        )
        return Outcome(device_id, "failed", "renewal-not-committed", message, serial)
    done = f"renewed: serial {serial} succeeds {old}" if old else f"renewal {serial} committed"
    return Outcome(device_id, "verified", "", done, serial, renews=old)
