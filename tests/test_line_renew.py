"""Field renewal over the serial line (station/line/renew.py, `station line run --renew`):
the real agent on a pty, the SoftHSM CA, the ledger; AWS IoT on moto for the sync."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from firmware_hooks.agent import CHAIN_FILE, RENEW_SUFFIX, STATE_FILE, Agent, AgentConfig
from firmware_hooks.host import BoardClient
from firmware_hooks.protocol import (
    ErrorCode,
    Message,
    MsgType,
    Tag,
    board_error,
    encode_message,
    encode_tlv,
)
from firmware_hooks.simboard import SimulatedBoard
from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.ledger.schema import audit_log
from station.line import ProvisionContext
from station.line.driver import open_port_client
from station.line.provision import Outcome, provision_board
from station.line.simkeys import CryptographyKeys
from station.settings import Settings
from tests.test_aws_states import Flow, flow  # noqa: F401 - the moto fixture
from tests.test_line_hostile import SwapPort, _agent, _swap_after

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def _ctx(ledger: Ledger, ca: CertificateAuthority, name: str) -> ProvisionContext:
    batch = ledger.create_batch(
        name, product="p", planned_count=16, key_mode="board-ecc", subject_template=TEMPLATE
    )
    return ProvisionContext(ledger, ca, batch)


def _renewing(ctx: ProvisionContext) -> ProvisionContext:
    return ProvisionContext(ctx.ledger, ctx.ca, ctx.batch, renew=True)


def _run(board: SimulatedBoard, ctx: ProvisionContext) -> Outcome:
    client = open_port_client(board.port)
    try:
        return provision_board(client, client.hello(), ctx)
    finally:
        client.close()


def _files(key_dir: Path) -> dict[str, bytes]:
    """The board's keys and chains (not the agent's own state file)."""
    return {
        p.name: p.read_bytes()
        for p in key_dir.iterdir()
        if not p.name.startswith(".") and p.name != STATE_FILE
    }


def _states(ledger: Ledger, device_id: str) -> dict[str, str]:
    return {c.serial: c.state for c in ledger.certificates(device_id)}


def _whitelisted(ledger: Ledger, device_id: str) -> list[str]:
    return [e.serial for e in ledger.whitelist() if e.device_id == device_id]


def _audit(ledger: Ledger, device_id: str) -> list[str]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            select(audit_log.c.action)
            .where(audit_log.c.entity == device_id)
            .order_by(audit_log.c.seq)
        )
        return list(rows.scalars())


@pytest.mark.parametrize("max_protocol", [1, 2, 3])
def test_a_verified_board_renews_over_the_line(
    station_settings: Settings, ca: CertificateAuthority, max_protocol: int
) -> None:
    ledger = Ledger.from_settings(station_settings)
    ctx = _ctx(ledger, ca, f"renew-v{max_protocol}")
    with SimulatedBoard(baudrate=None, agent_args=["--max-protocol", str(max_protocol)]) as board:
        first = _run(board, ctx)
        assert first.result == "verified"
        before = _files(board.key_dir)
        # Without --renew a verified board is skipped, as always.
        assert _run(board, ctx).code == "already-verified"
        outcome = _run(board, _renewing(ctx))
        after = _files(board.key_dir)
    device_id = board.hardware_id
    assert (outcome.result, outcome.renews) == ("verified", first.serial), outcome
    old, new = first.serial, outcome.serial
    assert old is not None and new is not None and new != old
    # The ledger: succession, the whitelist on the new serial, the device verified.
    assert _states(ledger, device_id) == {old: "superseded", new: "issued"}
    assert _whitelisted(ledger, device_id) == [new]
    device = ledger.get_device(device_id)
    assert device.state == "verified" and device.serial == new
    assert device.chain_sha256 == hashlib.sha256(after[CHAIN_FILE]).hexdigest()
    # The renewal's entries, and no device.state among them: never failed, never re-verified.
    assert _audit(ledger, device_id)[-3:] == ["cert.intent", "cert.issued", "cert.supersede"]
    # The board: a new key, the new chain, nothing of the renewal left beside them.
    assert set(after) == set(before) and after["deviceCert.key"] != before["deviceCert.key"]
    cert = x509.load_pem_x509_certificate(after[CHAIN_FILE])
    assert format(cert.serial_number, "x") == new
    key = serialization.load_pem_private_key(after["deviceCert.key"], None)
    assert cert.public_key() == key.public_key()
    assert ledger.audit_verify() is None


class TurnsBad(CryptographyKeys):
    """Signs with its key until ``bad`` is set, then signs with a stranger's key
    whatever it is asked to sign with the renewal's key (the live key still signs)."""

    bad = False

    def sign(self, key_path: Path, data: bytes) -> bytes:
        if self.bad and key_path.name.endswith(RENEW_SUFFIX):
            return ec.generate_private_key(ec.SECP256R1()).sign(data, ec.ECDSA(hashes.SHA256()))
        return super().sign(key_path, data)


def _kept_old_identity(ledger: Ledger, device_id: str, old: str, outcome: Outcome) -> str:
    """The renewal failed and nothing of the board's live identity was lost; returns
    the serial of the abandoned certificate."""
    states = _states(ledger, device_id)
    (abandoned,) = set(states) - {old}
    assert states == {old: "issued", abandoned: "revoked"}
    assert ledger.certificate(abandoned).revoke_reason == f"renewal abandoned ({outcome.code})"
    assert _whitelisted(ledger, device_id) == [old]
    device = ledger.get_device(device_id)
    assert (device.state, device.serial, device.failure_code) == ("verified", old, None)
    assert "cert.renewal-abandoned" in _audit(ledger, device_id)
    assert ledger.audit_verify() is None
    return abandoned


def test_a_renewal_whose_proof_fails_keeps_the_old_key_and_certificate(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    ledger = Ledger.from_settings(station_settings)
    ctx = _ctx(ledger, ca, "renew-bad-proof")
    keys = TurnsBad()
    with SimulatedBoard(mode="thread", baudrate=None, keys=keys) as board:
        first = _run(board, ctx)
        assert first.result == "verified" and first.serial is not None
        before = _files(board.key_dir)
        keys.bad = True
        outcome = _run(board, _renewing(ctx))
        assert (outcome.result, outcome.code) == ("failed", "bad-proof"), outcome
        assert "stays live" in outcome.message
        # ABORT wiped the renewal only: the live key and chain are the old ones.
        assert _files(board.key_dir) == before
        client = open_port_client(board.port)
        try:
            client.hello()
            status = client.status()
        finally:
            client.close()
        assert status["state"] == "chain-stored"
        assert status["chain_sha256"] == hashlib.sha256(before[CHAIN_FILE]).hexdigest()
    _kept_old_identity(ledger, board.hardware_id, first.serial, outcome)


def test_a_board_swapped_after_the_renewal_chain_keeps_its_old_identity(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    ledger = Ledger.from_settings(station_settings)
    ctx = _ctx(ledger, ca, "renew-swap")
    a, b = _agent(tmp_path, "BOARD-A"), _agent(tmp_path, "BOARD-B")
    port = SwapPort(a)
    client = BoardClient(port, protocol_versions=(1,))  # SwapPort speaks version 1
    first = provision_board(client, client.hello(), ctx)
    assert first.result == "verified" and first.serial is not None
    a_files, b_files = _files(a.config.key_dir), _files(b.config.key_dir)

    hello = client.hello()
    start = len(port.seen)
    _swap_after(port, MsgType.PUT_CHAIN, b)
    outcome = provision_board(client, hello, _renewing(ctx))
    assert (outcome.result, outcome.code) == ("failed", "board-changed"), outcome
    # Board B got nothing: every request after the swap named board A (WRONG_BOARD).
    assert _files(b.config.key_dir) == b_files
    assert ("BOARD-B", MsgType.ABORT) not in port.seen[start:]
    # Board A, unplugged mid-renewal, still holds its live key and chain.
    live = _files(a.config.key_dir)
    assert live["deviceCert.key"] == a_files["deviceCert.key"]
    assert live[CHAIN_FILE] == a_files[CHAIN_FILE]
    _kept_old_identity(ledger, "BOARD-A", first.serial, outcome)

    # Plugged in again: a renewal starts afresh (its leftover renewal files dropped).
    port.board, port.hook = a, None
    again = provision_board(client, client.hello(), _renewing(ctx))
    assert (again.result, again.renews) == ("verified", first.serial), again
    assert _whitelisted(ledger, "BOARD-A") == [again.serial]
    assert not any(name.endswith(RENEW_SUFFIX) for name in _files(a.config.key_dir))


def test_an_agent_without_renewal_is_refused_and_keeps_everything(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    ledger = Ledger.from_settings(station_settings)
    ctx = _ctx(ledger, ca, "renew-old-agent")
    with SimulatedBoard(baudrate=None, agent_args=["--no-renew"]) as board:
        first = _run(board, ctx)
        assert first.result == "verified"
        before = _files(board.key_dir)
        outcome = _run(board, _renewing(ctx))
        assert _files(board.key_dir) == before
    assert (outcome.result, outcome.code) == ("skipped", "renewal-unsupported"), outcome
    assert "no 'renew' capability" in outcome.message
    device_id = board.hardware_id
    assert _states(ledger, device_id) == {first.serial: "issued"}
    assert _whitelisted(ledger, device_id) == [first.serial]
    assert ledger.get_device(device_id).state == "verified"


def test_a_commit_the_board_never_got_is_finished_at_the_next_plug(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The ledger confirmed (the proof was good), then the board left before its
    RENEW_COMMIT: the next --renew run finds the renewal's chain on it and commits."""
    ledger = Ledger.from_settings(station_settings)
    ctx = _ctx(ledger, ca, "renew-commit")
    a, b = _agent(tmp_path, "BOARD-A"), _agent(tmp_path, "BOARD-B")
    port = SwapPort(a)
    client = BoardClient(port, protocol_versions=(1,))
    first = provision_board(client, client.hello(), ctx)
    hello = client.hello()

    def unplug_at_commit(m: object) -> None:
        if getattr(m, "type", None) == MsgType.RENEW_COMMIT:
            port.board = b

    port.hook = unplug_at_commit
    outcome = provision_board(client, hello, _renewing(ctx))
    assert (outcome.result, outcome.code) == ("failed", "renewal-not-committed"), outcome
    new = outcome.serial
    assert _whitelisted(ledger, "BOARD-A") == [new]
    assert Agent(a.config).session.state == "renewing"  # what a restarted agent would say

    port.board, port.hook = a, None
    done = provision_board(client, client.hello(), _renewing(ctx))
    assert (done.result, done.serial) == ("verified", new), done
    chain = (a.config.key_dir / CHAIN_FILE).read_bytes()
    assert format(x509.load_pem_x509_certificate(chain).serial_number, "x") == new
    assert ledger.get_device("BOARD-A").chain_sha256 == hashlib.sha256(chain).hexdigest()
    assert first.serial in _states(ledger, "BOARD-A")


def test_the_whitelist_sync_follows_the_renewed_serial(flow: Flow) -> None:  # noqa: F811
    """AWS IoT (moto) and the JITR Lambda: a failed renewal changes nothing there; a
    renewal makes the old certificate INACTIVE and lets the new one in."""
    ctx = ProvisionContext(flow.ledger, flow.ca, flow.ledger.get_batch("B1"))
    keys = TurnsBad()
    with SimulatedBoard(mode="thread", baudrate=None, keys=keys) as board:
        first = _run(board, ctx)
        old = x509.load_pem_x509_certificate((board.key_dir / CHAIN_FILE).read_bytes())
        assert flow.sync().added == 1
        flow.connect(old)
        assert flow.status(old) == "ACTIVE"

        keys.bad = True
        assert _run(board, _renewing(ctx)).code == "bad-proof"
        flow.sync()
        assert flow.status(old) == "ACTIVE"
        assert [e.serial for e in flow.ledger.whitelist()] == [first.serial]

        keys.bad = False
        renewed = _run(board, _renewing(ctx))
        assert renewed.result == "verified"
        new = x509.load_pem_x509_certificate((board.key_dir / CHAIN_FILE).read_bytes())
    report = flow.sync()
    assert report.added == 1 and report.removed == 1
    item = flow.ddb.get_item(
        TableName="states-whitelist", Key={"serial": {"S": format(new.serial_number, "x")}}
    )
    assert item["Item"]["device_id"]["S"] == board.hardware_id
    assert flow.status(old) == "INACTIVE"  # superseded, not revoked
    flow.connect(new)
    assert flow.status(new) == "ACTIVE"


# --------------------------------------------------------------------------- the agent alone


def _ask(agent: Agent, msg_type: MsgType, fields: list[tuple[int, bytes | str | int]]) -> Message:
    return agent.handle(Message(msg_type, 1, encode_tlv(fields)))


STUB = b"-----BEGIN CERTIFICATE-----\n%s\n-----END CERTIFICATE-----\n"


def test_the_agent_renews_only_a_board_with_a_key_and_a_chain(tmp_path: Path) -> None:
    agent = Agent(AgentConfig(key_dir=tmp_path, hardware_id="B-1", keys=CryptographyKeys()))
    subject = [(Tag.SUBJECT, "/O=company/CN=B-1")]
    refused = _ask(agent, MsgType.RENEW_KEY_CSR, subject)
    assert board_error(refused.payload).error_code == ErrorCode.BAD_STATE
    old = AgentConfig(key_dir=tmp_path / "old", hardware_id="B-2", renewal=False)
    unknown = _ask(Agent(old), MsgType.RENEW_KEY_CSR, subject)
    assert board_error(unknown.payload).error_code == ErrorCode.UNKNOWN_COMMAND
    assert "renew" not in Agent(old).capabilities()


def test_a_commit_cut_by_a_power_loss_is_finished_when_the_agent_starts(tmp_path: Path) -> None:
    config = AgentConfig(key_dir=tmp_path, hardware_id="B-1", keys=CryptographyKeys())
    agent = Agent(config)
    subject = [(Tag.SUBJECT, "/O=company/CN=B-1")]
    _ask(agent, MsgType.GEN_KEY_CSR, subject)
    _ask(agent, MsgType.PUT_CHAIN, [(Tag.CHAIN, STUB % b"old")])
    assert _ask(agent, MsgType.RENEW_KEY_CSR, subject).type == MsgType.RENEW_KEY_CSR_OK
    _ask(agent, MsgType.PUT_CHAIN, [(Tag.CHAIN, STUB % b"new")])
    assert (tmp_path / CHAIN_FILE).read_bytes() == STUB % b"old"  # beside, not in place
    new_key = (tmp_path / ("deviceCert.key" + RENEW_SUFFIX)).read_bytes()
    # RENEW_COMMIT got as far as the key when the power went.
    (tmp_path / ("deviceCert.key" + RENEW_SUFFIX)).replace(tmp_path / "deviceCert.key")
    restarted = Agent(config)
    assert restarted.session.state == "chain-stored"
    assert (tmp_path / CHAIN_FILE).read_bytes() == STUB % b"new"
    assert (tmp_path / "deviceCert.key").read_bytes() == new_key
    assert restarted.session.chain_sha256 == hashlib.sha256(STUB % b"new").hexdigest()
    # A plain ABORT now leaves the committed key and chain: they belong to no session.
    _ask(restarted, MsgType.ABORT, [])
    assert (tmp_path / "deviceCert.key").read_bytes() == new_key


# --------------------------------------------------------------------------- the operator's command


@pytest.mark.parametrize("processes", ["1", "2"])
def test_station_line_run_renew(station_env: Settings, processes: str) -> None:
    """`station line run --renew` (a closed batch still renews its boards), in one
    process and with the ports shared out among worker processes."""
    import json

    import typer
    from typer.testing import CliRunner

    from station.cli import line_cmds

    app = typer.Typer(pretty_exceptions_enable=False)
    line_cmds.register(app)
    with Ledger.from_settings(station_env) as ledger:
        ledger.create_batch(
            "L1", product="p", planned_count=4, key_mode="board-ecc", subject_template=TEMPLATE
        )

    def run(board: SimulatedBoard, *extra: str) -> list[dict[str, object]]:
        args = ["line", "run", "--batch", "L1", "--port", board.port, "--json-lines"]
        result = CliRunner().invoke(app, [*args, "--count", "1", "--timeout", "60", *extra])
        assert result.exit_code == 0, result.stdout + result.stderr
        return [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]

    with SimulatedBoard(baudrate=None) as board:
        (first,) = run(board)
        with Ledger.from_settings(station_env) as ledger:
            ledger.close_batch("L1")
        verdicts = run(board, "--renew", "--processes", processes)
    assert first["result"] == "verified"
    with Ledger.from_settings(station_env) as ledger:
        (new,) = [e.serial for e in ledger.whitelist()]
        assert ledger.certificate(str(first["serial"])).state == "superseded"
        assert ledger.certificate(new).state == "issued"
    if processes == "1":  # worker processes print no verdicts (the table at the end)
        (renewed,) = verdicts
        assert renewed["result"] == "verified" and renewed["renews"] == first["serial"]
        assert renewed["serial"] == new
    assert "--renew" in CliRunner().invoke(app, ["line", "run", "--help"]).stdout


# --------------------------------------------------------------------------- the line driver


class Pluggable(SwapPort):
    """A SwapPort whose board can be unplugged (``board = None``: nothing answers)."""

    def write(self, data: bytes, /) -> int:
        self.dec.feed(data)
        while (m := self.dec.next_message()) is not None:
            if self.hook is not None:
                self.hook(m)
            if self.board is not None:
                self.buf += encode_message(self.board.handle(m))
        return len(data)


def test_a_renewal_that_failed_is_tried_again_when_the_board_is_plugged_in_again(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The line driver takes a board heard again after silent polls for the same
    verified board (a noisy cable); one whose renewal failed on this port is a new plug
    and is renewed again (here: its commit never reached it, renewal-not-committed)."""
    import threading

    from station.line import LineDriver

    ledger = Ledger.from_settings(station_settings)
    ctx = _ctx(ledger, ca, "renew-replug")
    a = _agent(tmp_path, "BOARD-A")
    port = Pluggable(a)
    fast = {MsgType.RENEW_COMMIT: 0.3, MsgType.HELLO: 0.3}
    client = BoardClient(port, protocol_versions=(1,), timeouts=fast, retries=0)
    assert provision_board(client, client.hello(), ctx).result == "verified"

    def unplug_at_commit(m: Message) -> None:
        if m.type == MsgType.RENEW_COMMIT:
            port.board = None  # the operator pulls the cable as the commit goes out

    port.hook = unplug_at_commit

    def replug_later(record: object) -> None:
        def replug() -> None:
            port.hook = None
            port.board = a

        threading.Timer(2.5, replug).start()

    driver = LineDriver(
        _renewing(ctx),
        lambda: ["pluggable"],
        client_factory=lambda path: client,
        poll_interval=0.1,
        on_record=replug_later,
    )
    driver.run(until=lambda d: len(d.records) >= 2, timeout=30)
    outcomes = [(r.outcome.result, r.outcome.code) for r in driver.records]
    assert outcomes == [("failed", "renewal-not-committed"), ("verified", "")], [
        r.outcome for r in driver.records
    ]
    chain = (a.config.key_dir / CHAIN_FILE).read_bytes()
    (serial,) = _whitelisted(ledger, "BOARD-A")
    assert format(x509.load_pem_x509_certificate(chain).serial_number, "x") == serial
