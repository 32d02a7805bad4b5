"""`station init` and `station ca ...`: the CA key in the token and its certificate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from hsm import KeyType
from station.ca import import_ca_certificate, init_ca, open_ca
from station.cli.common import cli_errors, console, settings

ca_app = typer.Typer(help="Show or install the station's CA certificate.", no_args_is_help=True)


@cli_errors
def init_cmd(
    key_type: Annotated[
        KeyType, typer.Option("--key-type", help="Key generated in the token.")
    ] = KeyType.EC_P256,
    subject: Annotated[
        str | None,
        typer.Option(help="CA subject, e.g. '/O=company/CN=Line 1 CA'. Default names the station."),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the CA certificate.")] = 7300,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Make a new CA key beside the existing one (kept) and a new certificate.",
        ),
    ] = False,
    csr_out: Annotated[
        Path | None,
        typer.Option("--csr-out", help="Write a CSR for an external root instead of self-signing."),
    ] = None,
) -> None:
    """Create the CA key inside the PKCS#11 token and its certificate.

    With no STATION_CA_KEY_URI, a development SoftHSM2 token is made inside the
    data directory. Running it again keeps the existing CA.
    """
    outcome = init_ca(
        settings(), key_type=key_type, subject=subject, days=days, force=force, csr_out=csr_out
    )
    console.print(f"[bold]{outcome.status}[/]: {outcome.message}")
    if outcome.ca is not None:
        _print_ca(outcome.ca.describe())


def _print_ca(info: dict[str, str]) -> None:
    for key, value in info.items():
        console.print(f"  {key:<19} {value}", highlight=False)


@ca_app.command("show")
@cli_errors
def show_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Subject, key type, SHA-256 fingerprint, validity and key URI (never the PIN)."""
    info = open_ca(settings()).describe()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        _print_ca(info)


@ca_app.command("import-cert")
@cli_errors
def import_cert_cmd(
    cert: Annotated[Path, typer.Argument(help="PEM: the station CA certificate, then its chain.")],
) -> None:
    """Install the certificate an external root issued for the key in the token."""
    ca = import_ca_certificate(settings(), cert.read_bytes())
    console.print("installed the CA certificate; it matches the key in the token")
    _print_ca(ca.describe())


@ca_app.command("pem")
@cli_errors
def pem_cmd() -> None:
    """Print the CA chain (PEM), as boards and AWS IoT need it."""
    typer.echo(open_ca(settings()).chain_pem.decode(), nl=False)


def register(app: typer.Typer) -> None:
    app.command("init")(init_cmd)
    app.add_typer(ca_app, name="ca")
