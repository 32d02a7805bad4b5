"""`station label`: shipping labels (QR code, PNG and PDF) for a batch's verified boards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from station.cli.common import cli_errors, console, settings


@cli_errors
def label_cmd(
    batch: Annotated[str, typer.Argument(help="Batch whose verified boards get labels.")],
    out_dir: Annotated[
        Path, typer.Option("--out-dir", help="Where <device id>.png, .pdf and labels.csv go.")
    ],
) -> None:
    """Write a label per verified board: QR code with its device id and certificate
    SHA-256 fingerprint, as PNG and PDF, and labels.csv listing them."""
    from station.labels import write_batch
    from station.ledger import Ledger

    out_dir.mkdir(parents=True, exist_ok=True)
    with Ledger.from_settings(settings()) as ledger:
        n = write_batch(ledger, batch, out_dir)
    console.print(f"wrote {n} labels to {out_dir}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("label")(label_cmd)
