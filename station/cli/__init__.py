"""The `station` command line. Sub-commands live in sibling modules, one per area."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Factory-line provisioning station: HSM-backed CA, ledger, serial line, AWS IoT JITR.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def main() -> None:
    from station.cli import register
    from station.cli.common import uncut_when_not_a_terminal

    uncut_when_not_a_terminal(app)
    register.register_all(app)
    app()
