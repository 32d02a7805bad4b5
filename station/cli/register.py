"""One place that mounts every CLI area on the `station` app."""

from __future__ import annotations

import importlib

import typer

# Each module exposes `register(app: typer.Typer) -> None`.
MODULES = [
    "station.cli.ca_cmds",
    "station.cli.hsm_cmds",
    "station.cli.ledger_cmds",
    "station.cli.aws_cmds",
    "station.cli.serve_cmds",
    "station.cli.line_cmds",
    "station.cli.report_cmds",
    "station.cli.publish_cmds",
    "station.cli.label_cmds",
]


def register_all(app: typer.Typer) -> None:
    for name in MODULES:
        importlib.import_module(name).register(app)
