"""`station line run` and `station demo`: the serial line from the command line."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from firmware_hooks.simboard import Faults, SimulatedBoard, simulate_boards
from station.ca import open_ca
from station.cli.common import cli_errors, console, fail, settings
from station.errors import ConflictError, StationError
from station.ledger import BatchState, Ledger
from station.ledger.records import RecoveryReport
from station.line import LineDriver, LineStatus, ProvisionContext, open_port_client
from station.line.driver import BoardRecord, glob_ports
from station.line.procs import ProcessLine
from station.line.status import STATUS_FILE
from station.line.view import run_with_view
from station.recovery import recover_at_startup

line_app = typer.Typer(
    help="The serial line: provision boards on serial ports.", no_args_is_help=True
)


def parse_faults(text: str) -> Faults:
    """``corrupt=0.01,drop=0.005,delay=0.1,disconnect_after=4000,nonsense,seed=1,direction=to-board``."""
    values: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.replace("-", "_")
        if key == "nonsense" and not eq:
            values[key] = True
        elif key in ("corrupt", "drop", "delay"):
            values[key] = float(value)
        elif key in ("disconnect_after", "seed"):
            values[key] = int(value)
        elif key == "direction" and value in ("both", "to-board", "to-host"):
            values[key] = value
        else:
            raise StationError(f"unknown fault {item!r}", code="bad-argument")
    return Faults(**values)  # type: ignore[arg-type]


@contextlib.contextmanager
def _simulated(n: int, baud: int, faults: Faults | None) -> Iterator[list[SimulatedBoard]]:
    prefix = f"SIM-{datetime.now().strftime('%m%d%H%M%S')}"
    with simulate_boards(n, id_prefix=prefix, baudrate=baud or None, faults=faults) as boards:
        yield boards


@line_app.command("run")
@cli_errors
def run_cmd(
    batch: Annotated[str, typer.Option("--batch", help="Open batch the boards join.")],
    port: Annotated[
        list[str] | None, typer.Option("--port", help="Serial device (repeatable).")
    ] = None,
    ports_glob: Annotated[
        str | None,
        typer.Option("--ports-glob", help="e.g. '/dev/ttyUSB*', rescanned every second."),
    ] = None,
    simulate: Annotated[
        int, typer.Option("--simulate", help="Provision N simulated boards, then stop.")
    ] = 0,
    faults: Annotated[
        str | None,
        typer.Option(help="Simulated cable faults, e.g. 'corrupt=0.005,drop=0.005,seed=1'."),
    ] = None,
    baud: Annotated[
        int, typer.Option(help="Line speed (simulated boards are throttled to it).")
    ] = 115200,
    count: Annotated[
        int | None, typer.Option(help="Stop after this many boards (default: run until Ctrl-C).")
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live/--no-live",
            help="Live terminal view; --no-live prints one line per board verdict and per "
            "port that cannot be opened, as they happen.",
        ),
    ] = True,
    json_lines: Annotated[
        bool,
        typer.Option(
            "--json-lines",
            help="Print each board verdict and port error as one JSON object per line "
            "(for machines; implies --no-live).",
        ),
    ] = False,
    timeout: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes the ports are shared out among (each its own HSM "
            "session and ledger connection); 1 runs every port in this process.",
        ),
    ] = 1,
    renew: Annotated[
        bool,
        typer.Option(
            "--renew",
            help="Field renewal: give every verified board of this batch plugged in a new "
            "key and certificate; the old stay live until the board proves the new ones "
            "(boards of other batches are skipped, renewal-other-batch). Without it "
            "verified boards are skipped.",
        ),
    ] = False,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="Write a label (QR code with device id and certificate fingerprint, PNG "
            "and PDF) for each board this run verified into this directory.",
        ),
    ] = None,
) -> None:
    """Provision every board plugged into the line, all ports at once.

    Progress goes to a live view and to DATA_DIR/line-status.json for the dashboard.
    """
    sources = sum((bool(port), ports_glob is not None, simulate > 0))
    if sources != 1:
        raise fail("bad-argument", "give exactly one of --port, --ports-glob or --simulate", 2)
    if faults and not simulate:
        raise fail("bad-argument", "--faults only applies to --simulate", 2)
    s = settings()
    with Ledger.from_settings(s) as ledger:
        record = ledger.get_batch(batch)
        # A closed batch still renews its boards (closing stops new boards, not the field).
        if record.state != BatchState.OPEN.value and not renew:
            raise ConflictError(f"batch {batch!r} is closed", code="batch-closed")
        ca = open_ca(s)
        # Intents a killed run of this station left would refuse their boards
        # (issuance-in-progress) until recovered; the lock is held while the line runs.
        recovered, lock = recover_at_startup(ledger, ca, s.data_dir)
        _print_recovery(recovered)
        ctx = ProvisionContext(ledger, ca, record, renew=renew)
        status = LineStatus(batch, s.data_dir / STATUS_FILE)
        with contextlib.ExitStack() as stack:
            stack.callback(lock.close)
            ports: Callable[[], list[str]]
            if simulate:
                boards = stack.enter_context(
                    _simulated(simulate, baud, parse_faults(faults) if faults else None)
                )
                fixed = [b.port for b in boards]
                ports = lambda: fixed  # noqa: E731
                count = count or simulate
            elif ports_glob is not None:
                ports = glob_ports(ports_glob)
            else:
                fixed = list(port or [])
                ports = lambda: fixed  # noqa: E731
            driver: LineDriver | ProcessLine
            printer = _VerdictPrinter(json_lines)
            on_record = None if live and not json_lines else printer.record
            if processes > 1:
                driver = ProcessLine(
                    s,
                    batch,
                    ports,
                    processes=processes,
                    status=status,
                    client_factory=functools.partial(open_port_client, baudrate=baud),
                    renew=renew,
                    on_record=on_record,
                    on_port_error=printer.port_error,
                )
            else:
                driver = LineDriver(
                    ctx,
                    ports,
                    status=status,
                    client_factory=lambda path: open_port_client(path, baudrate=baud),
                    on_record=on_record,
                    on_port_error=printer.port_error,
                )
            live = live and not json_lines
            until = None if count is None else (lambda d: len(d.records) >= count)
            records = run_with_view(
                driver, console, live=live and console.is_terminal, until=until, timeout=timeout
            )
        _print_run(records, ledger, batch)
        if labels is not None:
            from station.labels import write_batch

            verified = {r.outcome.device_id for r in records if r.outcome.result == "verified"}
            n = write_batch(ledger, batch, labels, only=verified)
            console.print(f"wrote {n} labels to {labels}", highlight=False, markup=False)
    if any(r.outcome.result == "failed" for r in records):
        raise typer.Exit(1)


class _VerdictPrinter:
    """One line per board verdict and per port that cannot be opened, as they happen
    (from the ports' threads: one lock, whole lines)."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines
        self._lock = threading.Lock()

    def _out(self, text: str) -> None:
        with self._lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def record(self, r: BoardRecord) -> None:
        o = r.outcome
        if self.json_lines:
            fields = {
                "event": "verdict",
                "port": r.port,
                "device_id": o.device_id,
                "result": o.result,
                "code": o.code,
                "message": o.message,
                "serial": o.serial,
                "seconds": round(r.seconds, 3),
                **({"renews": o.renews} if o.renews else {}),
            }
            self._out(json.dumps(fields))
            return
        reason = f" [{o.code}] {o.message}" if o.code else ""
        serial = f" serial {o.serial}" if o.serial and o.result == "verified" else ""
        self._out(f"{r.port} {o.device_id} {o.result}{serial}{reason} ({r.seconds:.2f} s)")

    def port_error(self, port: str, message: str) -> None:
        if self.json_lines:
            self._out(json.dumps({"event": "port-error", "port": port, "message": message}))
        else:
            self._out(f"error [port-error] {port}: {message}")


def _print_recovery(report: RecoveryReport) -> None:
    if report.resigned:
        console.print(
            f"recovered {len(report.resigned)} certificate(s) a stopped run had signed: "
            + ", ".join(report.resigned),
            highlight=False,
        )
    for serial, code in report.failed:
        console.print(f"intent {serial} could not be recovered: {code}", highlight=False)


def _print_run(records: list[BoardRecord], ledger: Ledger, batch: str) -> None:
    table = Table(title=f"Boards handled - batch {batch}")
    for column in ("port", "board", "result", "reason", "serial", "seconds"):
        table.add_column(column)
    for r in records:
        o = r.outcome
        table.add_row(r.port, o.device_id, o.result, o.code, o.serial or "", f"{r.seconds:.2f}")
    console.print(table)
    counts = ledger.counts(batch).get(batch, {})
    console.print(
        "batch " + batch + ": " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        highlight=False,
    )


@cli_errors
def demo_cmd(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Where the demo keeps its CA and ledger.")
    ] = Path("./var/demo"),
    boards: Annotated[int, typer.Option(help="Simulated boards per batch.")] = 4,
    baud: Annotated[int, typer.Option(help="Simulated line speed (0: unthrottled).")] = 115200,
) -> None:
    """The station's job end to end on simulated boards, checked by openssl and mosquitto."""
    from station.line.demo import run_demo

    code = run_demo(data_dir, boards=boards, baud=baud or None, console=console)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.add_typer(line_app, name="line")
    app.command("demo")(demo_cmd)
