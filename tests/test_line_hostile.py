"""A hostile or broken board must not stop the line or borrow another board's identity:
rich markup in its id or errors, an id the policy refuses, boards swapped on a port
mid-flow, two boards reporting one id. Real agents (on ptys, or their request
handler behind a port the test can swap)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from firmware_hooks.agent import Agent, AgentConfig
from firmware_hooks.host import BoardClient
from firmware_hooks.protocol import Message, MessageDecoder, MsgType, encode_message
from firmware_hooks.simboard import SimulatedBoard
from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.line import LineDriver, LineStatus, ProvisionContext
from station.line.driver import open_port_client
from station.line.provision import Outcome, provision_board
from station.line.simkeys import CryptographyKeys
from station.line.status import RECENT_OUTCOMES
from station.line.view import render
from station.settings import Settings

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def _ctx(settings: Settings, ca: CertificateAuthority, name: str) -> ProvisionContext:
    ledger = Ledger.from_settings(settings)
    batch = ledger.create_batch(
        name, product="p", planned_count=16, key_mode="board-ecc", subject_template=TEMPLATE
    )
    return ProvisionContext(ledger, ca, batch)


def _draw(status: LineStatus) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(render(status))
    return out.getvalue()


# --------------------------------------------------------------------------- the view


def test_board_text_is_shown_as_text_never_as_markup() -> None:
    status = LineStatus("b1")
    status.port_added("/dev/ttyACM0")
    status.step("/dev/ttyACM0", "hello", "[/]")
    status.finished("/dev/ttyACM0", "[/]", "failed", "board-error", "x")
    status.port_added("/dev/ttyACM1")
    status.finished(
        "/dev/ttyACM1", "GOOD-1", "failed", "board-error", "see_test status 1: [/oops] [bold]"
    )
    drawn = _draw(status)
    assert "[/]" in drawn and "[/oops] [bold]" in drawn


def test_status_keeps_a_bounded_history_and_bounded_texts() -> None:
    status = LineStatus("b1")
    for i in range(RECENT_OUTCOMES + 50):
        status.finished("/dev/p", f"D-{i}", "verified")
    assert len(status.outcomes) == RECENT_OUTCOMES
    assert "D-0" not in status.outcomes and f"D-{RECENT_OUTCOMES + 49}" in status.outcomes
    status.finished("/dev/p", "X" * 100_000, "failed", "board-error", "m" * 100_000)
    row = status.snapshot()["ports"][0]
    assert len(row["device_id"]) <= 80 and len(row["last_error"]) <= 600


def test_a_board_with_a_markup_id_is_refused_and_the_line_goes_on(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    ctx = _ctx(station_settings, ca, "hostile")
    with (
        SimulatedBoard(hardware_id="[/]", mode="thread", baudrate=None) as bad,
        SimulatedBoard(hardware_id="DEV-1\n", mode="thread", baudrate=None) as newline,
        SimulatedBoard(hardware_id="GOOD-1", mode="thread", baudrate=None) as good,
    ):
        ports = [bad.port, newline.port, good.port]
        driver = LineDriver(
            ctx,
            lambda: ports,
            client_factory=lambda p: open_port_client(p, baudrate=1_000_000),
        )
        console = Console(file=io.StringIO())
        driver.run(
            tick=lambda: console.print(render(driver.status)),  # what run_with_view does
            until=lambda d: len(d.records) >= 3,
            timeout=60,
        )
    by_port = {r.port: r.outcome for r in driver.records}
    assert by_port[good.port].result == "verified"
    for port in (bad.port, newline.port):
        assert (by_port[port].result, by_port[port].code) == ("failed", "bad-device-id")
    assert by_port[bad.port].device_id == "'[/]'"
    assert [d.device_id for d in ctx.ledger.list_devices(batch="hostile")] == ["GOOD-1"]


def test_a_tick_that_raises_does_not_stop_the_line(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    ctx = _ctx(station_settings, ca, "tick")
    with SimulatedBoard(hardware_id="TICK-1", mode="thread", baudrate=None) as board:
        driver = LineDriver(
            ctx,
            lambda: [board.port],
            client_factory=lambda p: open_port_client(p, baudrate=1_000_000),
        )

        def tick() -> None:
            raise RuntimeError("the view broke")

        driver.run(tick=tick, until=lambda d: bool(d.records), timeout=60)
    assert driver.records[0].outcome.result == "verified"


# --------------------------------------------------------------------------- swaps


class SwapPort:
    """A port whose far end is whichever agent is plugged (``board``); ``hook(msg)``
    runs before the board handles each request (the operator's hands)."""

    timeout: float | None = 0.05
    write_timeout: float | None = None

    def __init__(self, board: Agent) -> None:
        self.board = board
        self.buf = bytearray()
        self.dec = MessageDecoder()
        self.hook: Callable[[Message], None] | None = None
        self.seen: list[tuple[str, int]] = []  # (hardware id, request type)

    @property
    def in_waiting(self) -> int:
        return len(self.buf)

    def write(self, data: bytes, /) -> int:
        self.dec.feed(data)
        while (m := self.dec.next_message()) is not None:
            if self.hook is not None:
                self.hook(m)
            self.seen.append((self.board.config.hardware_id, m.type))
            self.buf += encode_message(self.board.handle(m))
        return len(data)

    def read(self, size: int = 1) -> bytes:
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _agent(tmp_path: Path, hid: str, keys_dir: str | None = None) -> Agent:
    return Agent(
        AgentConfig(
            key_dir=tmp_path / (keys_dir or f"keys-{hid}"), hardware_id=hid, keys=CryptographyKeys()
        )
    )


def _swap_after(port: SwapPort, trigger: MsgType, to: Agent) -> None:
    """Plug ``to`` in as soon as the request after ``trigger`` arrives."""
    armed = {"after": False}

    def hook(m: Message) -> None:
        if armed["after"] and port.board is not to:
            port.board = to
        if m.type == trigger:
            armed["after"] = True

    port.hook = hook


def _whitelisted(ctx: ProvisionContext) -> set[str]:
    return {e.serial for e in ctx.ledger.whitelist()}


def test_a_board_swapped_in_after_its_csr_gets_no_chain(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    ctx = _ctx(station_settings, ca, "swap-chain")
    a, b = _agent(tmp_path, "BOARD-A"), _agent(tmp_path, "BOARD-B")
    port = SwapPort(b)
    client = BoardClient(port, protocol_versions=(1,))  # SwapPort speaks version 1
    first = provision_board(client, client.hello(), ctx)
    assert first.result == "verified"
    b_chain = (b.config.key_dir / "deviceCertAndCACert.crt").read_bytes()

    port.board = a
    start = len(port.seen)
    hello = client.hello()
    _swap_after(port, MsgType.GEN_KEY_CSR, b)
    outcome = provision_board(client, hello, ctx)
    assert (outcome.result, outcome.code) == ("failed", "board-changed")
    assert ("BOARD-B", MsgType.PUT_CHAIN) not in port.seen[start:]
    assert (b.config.key_dir / "deviceCertAndCACert.crt").read_bytes() == b_chain
    assert ctx.ledger.get_device("BOARD-A").state == "failed"
    assert ctx.ledger.get_device("BOARD-B").state == "verified"
    assert _whitelisted(ctx) == {first.serial}


def test_a_board_swapped_in_after_the_proof_is_not_whitelisted(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    ctx = _ctx(station_settings, ca, "swap-prove")
    a, b = _agent(tmp_path, "BOARD-A"), _agent(tmp_path, "BOARD-B")
    port = SwapPort(a)
    client = BoardClient(port, protocol_versions=(1,))  # SwapPort speaks version 1
    hello = client.hello()
    _swap_after(port, MsgType.PROVE, b)
    outcome = provision_board(client, hello, ctx)
    assert (outcome.result, outcome.code) == ("failed", "board-changed")
    assert ctx.ledger.get_device("BOARD-A").state == "failed"
    assert _whitelisted(ctx) == set()


# --------------------------------------------------------------------------- same id twice


def _same_id_on_two_ports(
    tmp_path: Path, device_id: str, ctx1: ProvisionContext, ctx2: ProvisionContext
) -> tuple[Outcome, Outcome, SwapPort]:
    """Two boards report ``device_id``: the one on port 2 is provisioned with ``ctx2``,
    and when it asks for its key, the one on port 1 is run with ``ctx1``. Returns their
    outcomes (port 2, port 1) and port 1."""
    x1, x2 = _agent(tmp_path, device_id, "x1"), _agent(tmp_path, device_id, "x2")
    p1, p2 = SwapPort(x1), SwapPort(x2)
    c1, c2 = (BoardClient(p, protocol_versions=(1,)) for p in (p1, p2))
    h2 = c2.hello()
    meanwhile: list[Outcome] = []

    def other_port_runs(m: Message) -> None:
        if m.type == MsgType.GEN_KEY_CSR and not meanwhile:
            meanwhile.append(provision_board(c1, c1.hello(), ctx1))

    p2.hook = other_port_runs
    return provision_board(c2, h2, ctx2), meanwhile[0], p1


def test_a_second_board_with_a_verified_boards_id_does_not_unlist_it(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """Two stations (or worker processes) share the ledger; each has one of two boards
    reporting DEV-D. The one that loses must not take the winner off the whitelist."""
    ctx1 = _ctx(station_settings, ca, "dup")
    ctx2 = ProvisionContext(Ledger.from_settings(station_settings), ca, ctx1.batch)
    loser, winner, _ = _same_id_on_two_ports(tmp_path, "DEV-D", ctx1, ctx2)
    assert winner.result == "verified"
    assert (loser.result, loser.code) == ("failed", "already-provisioned")
    device = ctx1.ledger.get_device("DEV-D")
    assert device.state == "verified"
    assert _whitelisted(ctx1) == {winner.serial}


def test_one_station_never_runs_one_id_on_two_ports_at_once(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    ctx = _ctx(station_settings, ca, "dup-here")
    first, refused, p1 = _same_id_on_two_ports(tmp_path, "DEV-E", ctx, ctx)
    assert first.result == "verified"
    assert (refused.result, refused.code) == ("failed", "duplicate-id")
    assert not [t for _, t in p1.seen if t != MsgType.HELLO]  # nothing sent to the second board
    assert ctx.ledger.get_device("DEV-E").state == "verified"
    assert _whitelisted(ctx) == {first.serial}


def test_a_board_whose_key_is_another_devices_has_its_failure_recorded() -> None:
    """duplicate-key is this board's own fault (its random generator), not another run's
    claim on the device: its failure goes into the ledger like any other."""
    from station.line.provision import NOT_OURS

    assert "duplicate-key" not in NOT_OURS
    assert {"already-provisioned", "issuance-in-progress", "duplicate-id"} <= NOT_OURS
