"""`station crl`: the CRL relying parties load (a mosquitto `crlfile`, a gateway)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from station.ca import open_ca
from station.cli.common import cli_errors, console, settings
from station.ledger import Ledger
from station.publish import crl as crls


def _write_atomically(path: Path, data: bytes) -> None:
    """A reader (mosquitto reloading its crlfile) never sees half a CRL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # a CRL is public; brokers drop privileges before reading it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
) -> None:
    """Write the station's CRL (signed by the CA key in the token) to a file.

    The stored CRL is reused while it lists every revocation and has more than half
    its validity left; otherwise a new one (next CRL number) is signed.
    """
    validity = crls.check_validity_hours(validity_hours)
    s = settings()
    ca = open_ca(s)
    with Ledger.from_settings(s) as ledger:
        if fresh:
            made = crls.generate(ledger.engine, ca, s.station_id, validity=validity)
        else:
            made = crls.current(ledger.engine, ca, s.station_id, validity=validity)
    _write_atomically(out, made.der if der else made.pem)
    console.print(
        f"wrote CRL number {made.number} ({made.revoked_count} revoked, next update "
        f"{made.next_update.isoformat()}) to {out}",
        highlight=False,
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command("crl")(crl_cmd)
