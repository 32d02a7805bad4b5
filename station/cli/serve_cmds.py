"""`station serve` (the HTTP API under uvicorn) and `station token create`."""

from __future__ import annotations

from typing import Annotated

import typer

from station.cli.common import cli_errors, console, settings

token_app = typer.Typer(help="Bearer tokens of the HTTP API.", no_args_is_help=True)


@cli_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, help="Worker processes; each opens its own PKCS#11 session.")
    ] = 1,
    access_log: Annotated[
        bool, typer.Option(help="Log one line per request (off: the ledger records issuance).")
    ] = False,
) -> None:
    """Serve the HTTP API and the operator dashboard with uvicorn."""
    from api.server import serve as run_server

    settings()  # refuse bad STATION_* variables before starting workers
    run_server(host, port, workers, access_log=access_log)


@cli_errors
def token_create(
    role: Annotated[str, typer.Option(help="board, operator, qa or admin.")],
    name: Annotated[str, typer.Option(help="Who or what holds the token (unique).")],
) -> None:
    """Create a bearer token; it is printed once, only its SHA-256 is stored."""
    from station.ledger import Ledger

    with Ledger.from_settings(settings()) as ledger:
        token = ledger.create_token(name, role)
    console.print(token, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    token_app.command("create")(token_create)
    app.add_typer(token_app, name="token")
