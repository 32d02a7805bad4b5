"""Field renewal over the serial line, where it must not trust the board: a board
that only knows another's public chain, a renewal key the board could not make, a
confirmation the ledger wrote but could not report, a board of another batch.
Real agents over ptys, a real ledger and token (found in review)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from firmware_hooks.agent import CHAIN_FILE, STATE_FILE
from firmware_hooks.simboard import SimulatedBoard
from station.ca import CertificateAuthority
from station.errors import Kind, StationError
from station.ledger import Ledger
from station.line import ProvisionContext
from tests.test_line_renew import _ctx, _files, _renewing, _run, _states, _whitelisted


def test_a_board_that_knows_only_the_public_chain_cannot_renew_anothers_identity(
    station_settings: object, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The victim's certificate and the CA chain are public: a board that names the
    victim's hardware id and reports the digest of that chain must also sign with the
    victim's key before anything is renewed."""
    ledger = Ledger.from_settings(station_settings)  # type: ignore[arg-type]
    ctx = _ctx(ledger, ca, "victims")
    with SimulatedBoard(baudrate=None) as victim:
        first = _run(victim, ctx)
        victim_id = victim.hardware_id
    assert first.result == "verified" and first.serial
    public = ledger.certificate(first.serial).pem.encode() + ca.chain_pem  # type: ignore[union-attr]
    digest = hashlib.sha256(public).hexdigest()
    keys = tmp_path / "attacker"
    keys.mkdir(mode=0o700)
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
         "-out", str(keys / "deviceCert.key")],
        check=True,
    )  # fmt: skip
    (keys / CHAIN_FILE).write_bytes(public)
    state = {"key_mode": "board-ecc", "key_name": "deviceCert", "key_new": False}
    state |= {"chain_sha256": digest, "chain_new": False}
    (keys / STATE_FILE).write_text(json.dumps(state))
    with SimulatedBoard(baudrate=None, hardware_id=victim_id, key_dir=keys) as attacker:
        out = _run(attacker, _renewing(ctx))
    assert (out.result, out.code) == ("failed", "renewal-not-holder")
    assert _states(ledger, victim_id) == {first.serial: "issued"}
    assert _whitelisted(ledger, victim_id) == [first.serial]
    assert _files(keys)[CHAIN_FILE] == public  # nothing new was made or stored


def test_a_renewal_key_the_board_cannot_make_keeps_its_live_key_and_chain(
    station_settings: object, ca: CertificateAuthority, tmp_path: Path
) -> None:
    ledger = Ledger.from_settings(station_settings)  # type: ignore[arg-type]
    ctx = _ctx(ledger, ca, "keygen")
    keys = tmp_path / "board"
    with SimulatedBoard(baudrate=None, key_dir=keys) as board:
        first = _run(board, ctx)
        board_id = board.hardware_id
    before = _files(keys)
    # The same board later: its openssl signs but cannot make a key (a full disk).
    openssl = tmp_path / "openssl"
    openssl.write_text(
        '#!/bin/sh\ncase "$1" in ecparam|genpkey) exit 1;; esac\nexec openssl "$@"\n'
    )
    openssl.chmod(0o755)
    with SimulatedBoard(
        baudrate=None, key_dir=keys, hardware_id=board_id, agent_args=["--openssl", str(openssl)]
    ) as board:
        out = _run(board, _renewing(ctx))
    assert out.result == "failed" and out.serial == first.serial
    assert "ecparam" in out.message or "key" in out.message
    assert {k: v for k, v in _files(keys).items() if k != STATE_FILE} == {
        k: v for k, v in before.items() if k != STATE_FILE
    }
    assert _states(ledger, board_id) == {first.serial: "issued"}
    assert _whitelisted(ledger, board_id) == [first.serial]


def test_a_confirmation_written_but_not_reported_is_committed_not_aborted(
    station_settings: object, ca: CertificateAuthority
) -> None:
    """The ledger confirmed the renewal, then reported a failure (its disk sync, or a
    PostgreSQL connection lost at COMMIT): the board is told to commit the new key,
    not to drop it, since the ledger now whitelists only the new certificate."""
    ledger = Ledger.from_settings(station_settings)  # type: ignore[arg-type]
    ctx = _ctx(ledger, ca, "unsure")
    with SimulatedBoard(baudrate=None) as board:
        first = _run(board, ctx)
        real = ledger.renewals.prove

        def prove(*args: object, **kwargs: object) -> object:
            real(*args, **kwargs)  # type: ignore[arg-type]
            raise StationError("sync failed", code="ledger-sync-failed", kind=Kind.UNAVAILABLE)

        ledger.renewals.prove = prove  # type: ignore[method-assign]
        try:
            out = _run(board, _renewing(ctx))
        finally:
            ledger.renewals.prove = real  # type: ignore[method-assign]
        board_id = board.hardware_id
        chain = _files(board.key_dir)[CHAIN_FILE]
    assert out.result == "verified" and out.renews == first.serial
    assert _states(ledger, board_id) == {first.serial: "superseded", out.serial: "issued"}
    assert _whitelisted(ledger, board_id) == [out.serial]
    assert hashlib.sha256(chain).hexdigest() == ledger.get_device(board_id).chain_sha256


def test_a_line_renews_only_the_boards_of_its_own_batch(
    station_settings: object, ca: CertificateAuthority
) -> None:
    ledger = Ledger.from_settings(station_settings)  # type: ignore[arg-type]
    home = _ctx(ledger, ca, "home")
    other = _ctx(ledger, ca, "other")
    with SimulatedBoard(baudrate=None) as board:
        first = _run(board, home)
        out = _run(board, ProvisionContext(ledger, ca, other.batch, renew=True))
        board_id = board.hardware_id
    assert (out.result, out.code) == ("skipped", "renewal-other-batch")
    assert _states(ledger, board_id) == {first.serial: "issued"}
    assert ledger.get_device(board_id).batch == home.batch.name


def test_a_commit_whose_answer_was_lost_is_read_back_not_reported_unfinished(
    station_settings: object, ca: CertificateAuthority
) -> None:
    """The board committed the renewal, its answer was lost: STATUS shows the new
    chain live, so the renewal is done (plugging it in again would renew it again)."""
    from firmware_hooks.protocol import Timeout
    from station.line.driver import open_port_client
    from station.line.provision import provision_board

    ledger = Ledger.from_settings(station_settings)  # type: ignore[arg-type]
    ctx = _ctx(ledger, ca, "lost-answer")
    with SimulatedBoard(baudrate=None) as board:
        first = _run(board, ctx)
        client = open_port_client(board.port)
        real = client.renew_commit

        def renew_commit() -> bytes:
            real()
            raise Timeout("no valid reply to RENEW_COMMIT")

        client.renew_commit = renew_commit  # type: ignore[method-assign]
        try:
            out = provision_board(client, client.hello(), _renewing(ctx))
        finally:
            client.close()
        chain = _files(board.key_dir)[CHAIN_FILE]
    assert (out.result, out.renews) == ("verified", first.serial), out
    assert hashlib.sha256(chain).hexdigest() == ledger.get_device(board.hardware_id).chain_sha256


def test_a_renewal_whose_last_intent_a_crash_left_asks_for_recovery(
    station_settings: object, ca: CertificateAuthority
) -> None:
    """The station died while signing a board's renewal: the next --renew run finds
    an open intent and no live serial; it says to recover, not a traceback
    (``internal``; found in review)."""
    ledger = Ledger.from_settings(station_settings)  # type: ignore[arg-type]
    ctx = _ctx(ledger, ca, "crashed")
    with SimulatedBoard(baudrate=None) as board:
        first = _run(board, ctx)
        ledger.after_sign = lambda cert: (_ for _ in ()).throw(SystemExit("crash"))
        try:
            crashed = _run(board, _renewing(ctx))
        except SystemExit:
            crashed = None
        ledger.after_sign = None
        out = _run(board, _renewing(ctx))
        files = _files(board.key_dir)
    assert crashed is None or crashed.result == "failed"
    assert (out.result, out.code) == ("failed", "issuance-in-progress"), out
    assert "station recover" in out.message
    assert _whitelisted(ledger, board.hardware_id) == [first.serial]
    assert CHAIN_FILE in files
