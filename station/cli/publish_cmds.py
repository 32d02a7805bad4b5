"""`station crl`: the CRL relying parties load (a mosquitto `crlfile`, a gateway)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from hsm.errors import HsmError
from station.ca import open_ca
from station.cli.common import cli_errors, console, err_console, settings
from station.errors import StationError
from station.files import write_atomically
from station.ledger import Ledger
from station.publish import crl as crls


def _write(out: Path, made: crls.Crl, der: bool) -> None:
    # atomic, and world-readable: a CRL is public, and brokers read it after dropping
    # privileges; a reader (mosquitto reloading its crlfile) never sees half a CRL
    write_atomically(out, made.der if der else made.pem, mode=0o644)
    console.print(
        f"wrote CRL number {made.number} ({made.revoked_count} revoked, next update "
        f"{made.next_update.isoformat()}) to {out}",
        highlight=False,
        markup=False,
    )


@cli_errors
def crl_cmd(
    out: Annotated[Path, typer.Option("--out", help="Where to write the CRL.")],
    der: Annotated[bool, typer.Option("--der", help="DER instead of PEM.")] = False,
    validity_hours: Annotated[
        int, typer.Option("--validity-hours", help="nextUpdate this many hours on.")
    ] = 24,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Sign a new CRL even if the stored one is current.")
    ] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", help="Keep the file current: check every --interval s until stopped."
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.5, max=3600, help="Seconds between checks with --watch.")
    ] = 5.0,
) -> None:
    """Write the station's CRL (signed by the CA key in the token) to a file.

    The stored CRL is reused while it lists every revocation and has more than half
    its validity left; otherwise a new one (next CRL number) is signed. With --watch
    the file is rewritten whenever that happens: within --interval seconds of a
    revocation, and well before nextUpdate.
    """
    validity = crls.check_validity_hours(validity_hours)
    s = settings()
    ca = open_ca(s)
    with Ledger.from_settings(s) as ledger:
        if fresh:
            made = crls.generate(ledger.engine, ca, s.station_id, validity=validity)
        else:
            made = crls.current(ledger.engine, ca, s.station_id, validity=validity)
        _write(out, made, der)
        if not watch:
            return
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(interval):
                try:
                    now = crls.current(ledger.engine, ca, s.station_id, validity=validity)
                except (StationError, HsmError) as exc:  # the next round tries again
                    code = getattr(exc, "code", "crl-failed")
                    err_console.print(f"error [{code}] {exc}", highlight=False, markup=False)
                    continue
                if now.number != made.number:
                    made = now
                    _write(out, made, der)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)


def register(app: typer.Typer) -> None:
    app.command("crl")(crl_cmd)
