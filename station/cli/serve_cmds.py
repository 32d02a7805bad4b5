"""`station serve` (the HTTP API under uvicorn) and `station token create|list|revoke`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from station.cli.common import cli_errors, console, err_console, settings

token_app = typer.Typer(help="Bearer tokens of the HTTP API.", no_args_is_help=True)
tls_app = typer.Typer(help="TLS for `station serve`.", no_args_is_help=True)


@cli_errors
def serve(
    host: Annotated[
        str, typer.Option(envvar="STATION_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="STATION_PORT", min=0, max=65535, help="TCP port.")
    ] = 8000,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            show_default=False,
            help="Worker processes, each with its own PKCS#11 session. [default: cores + 1]",
        ),
    ] = None,
    access_log: Annotated[
        bool, typer.Option(help="Log one line per request (off: the ledger records issuance).")
    ] = False,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="PEM server certificate (chain); default STATION_TLS_CERT."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="PEM key of --tls-cert; default STATION_TLS_KEY.")
    ] = None,
) -> None:
    """Serve the HTTP API, EST, CMP and the dashboard with uvicorn (HTTPS with --tls-cert)."""
    from api.server import default_workers
    from api.server import serve as run_server
    from station.tls import plain_http_warning, tls_files

    s = settings()  # refuse bad STATION_* variables before starting workers
    tls = tls_files(s, tls_cert, tls_key)
    if tls is None and (warning := plain_http_warning(host)) is not None:
        err_console.print(f"[bold red]{escape(warning)}[/]", highlight=False)
    run_server(host, port, workers or default_workers(), access_log=access_log, tls=tls)


@cli_errors
def tls_init(
    host: Annotated[
        list[str], typer.Option(help="Host name or IP address clients use (repeat for more).")
    ],
    days: Annotated[int, typer.Option(min=1, max=825, help="Validity in days.")] = 825,
) -> None:
    """Make a development TLS server key and certificate under DATA_DIR/tls/.

    Signed by a throw-away CA whose key is never stored (not the station's CA, whose
    certificates are device identities). Give clients tls/ca.pem.
    """
    from station.tls import init_dev_tls

    made = init_dev_tls(settings(), host, days=days)
    console.print(f"certificate {made.cert}", highlight=False)
    console.print(f"key         {made.key}", highlight=False)
    console.print(f"clients trust {made.ca}", highlight=False)
    console.print(
        f"serve with: STATION_TLS_CERT={made.cert} STATION_TLS_KEY={made.key} station serve",
        highlight=False,
    )


@cli_errors
def token_create(
    role: Annotated[str, typer.Option(help="board, operator, qa or admin.")],
    name: Annotated[str, typer.Option(help="Who or what holds the token (unique).")],
    expires_in: Annotated[
        str | None,
        typer.Option(help="Lifetime, e.g. 12h, 30d, 2w (default: until revoked)."),
    ] = None,
) -> None:
    """Create a bearer token; it is printed once, only its SHA-256 is stored."""
    from station.durations import parse_duration
    from station.ledger import Ledger

    lifetime = None if expires_in is None else parse_duration(expires_in)
    with Ledger.from_settings(settings()) as ledger:
        token = ledger.create_token(name, role, expires_in=lifetime)
    console.print(token, highlight=False)


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


@cli_errors
def token_list() -> None:
    """Every token: name, role, created, last used, expires, revoked (never the token)."""
    from station.ledger import Ledger

    with Ledger.from_settings(settings()) as ledger:
        tokens = ledger.list_tokens()
    rows = [("name", "role", "created", "last-used", "expires", "revoked")]
    rows += [
        (t.name, t.role, _when(t.created_at), _when(t.last_used_at), _when(t.expires_at),
         _when(t.revoked_at))
        for t in tokens
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        console.print(line.rstrip(), highlight=False, markup=False)


@cli_errors
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
) -> None:
    """Revoke a token: the API refuses it within 5 seconds in every worker."""
    from station.ledger import Ledger

    with Ledger.from_settings(settings()) as ledger:
        revoked = ledger.revoke_token(name)
    console.print(f"revoked token {revoked.name} ({revoked.role})", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    token_app.command("create")(token_create)
    token_app.command("list")(token_list)
    token_app.command("revoke")(token_revoke)
    app.add_typer(token_app, name="token")
    tls_app.command("init")(tls_init)
    app.add_typer(tls_app, name="tls")
