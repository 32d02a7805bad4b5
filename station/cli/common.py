"""What every CLI command shares: settings, one-line errors, exit codes."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import IO, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from hsm.errors import HsmError
from station.errors import Kind, StationError, kind_of
from station.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

# Width of the consoles when their stream is a pipe or a log: nothing is cut.
UNCUT_WIDTH = 100_000


def uncut_when_not_a_terminal(app: typer.Typer) -> None:
    """In pipes and logs nothing is squeezed to 80 columns: no id or serial is ever cut.

    Rich sizes a console that is not a terminal to 80 columns and folds or cuts
    tables to fit; typer's rich help does the same to option names and help
    text. Not on a terminal, the consoles get a width no line reaches and help
    is click's plain text (wrapped, never cut).
    """
    import typer.core

    if not console.is_terminal:
        console.width = UNCUT_WIDTH
    if not err_console.is_terminal:
        err_console.width = UNCUT_WIDTH
    if not sys.stdout.isatty():
        typer.core.HAS_RICH = False
        # click cuts a command's short help to fit the width ("checked by..."); sub-command
        # contexts inherit these from the root.
        app.info.context_settings = {
            **(app.info.context_settings or {}),
            "terminal_width": UNCUT_WIDTH,
            "max_content_width": UNCUT_WIDTH,
        }


class ListFormat(StrEnum):
    """Output of the list commands: aligned columns for people, TSV or JSON for programs."""

    TABLE = "table"
    TSV = "tsv"
    JSON = "json"


def _tsv_field(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def write_rows(
    rows: Iterable[Mapping[str, Any]],
    fmt: ListFormat,
    columns: list[str],
    table: Callable[[Mapping[str, Any]], str],
    header: str,
    out: IO[str] | None = None,
) -> int:
    """Stream ``rows`` in ``fmt``; never cut a value. Returns the number of rows.

    TSV: a header of ``columns``, one row a line, tab, newline, carriage return
    and backslash escaped as ``\\t \\n \\r \\\\``. JSON: one array of objects with
    the ``columns`` as keys, written as it is read (flat memory for any count).
    TABLE: ``header`` then ``table(row)`` per row.
    """
    out = out or sys.stdout
    n = 0
    if fmt is ListFormat.JSON:
        out.write("[")
        for row in rows:
            out.write(("," if n else "") + "\n" + json.dumps({c: row.get(c) for c in columns}))
            n += 1
        out.write("\n]\n" if n else "]\n")
    elif fmt is ListFormat.TSV:
        out.write("\t".join(columns) + "\n")
        for row in rows:
            out.write("\t".join(_tsv_field(row.get(c)) for c in columns) + "\n")
            n += 1
    else:
        out.write(header + "\n")
        for row in rows:
            out.write(table(row) + "\n")
            n += 1
    out.flush()
    return n


# Exit codes (the README's table): 0 done, 1 the request was refused (policy,
# the ledger's state, not found, bad input), 2 usage (typer's own), 3 not
# configured (a bad STATION_* setting, no CA, no AWS registration, the HSM
# module or PIN source), 4 a part the station depends on does not answer (the
# ledger's database, the token, AWS), 5 something the station must hold alone is
# taken (the TCP port of `station serve`), 130 interrupted.
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NOT_CONFIGURED = 3
EXIT_UNAVAILABLE = 4
EXIT_IN_USE = 5

# The one place an error kind becomes an exit code; every other kind is a refusal.
EXIT_OF_KIND: dict[Kind, int] = {
    Kind.NOT_CONFIGURED: EXIT_NOT_CONFIGURED,
    Kind.UNAVAILABLE: EXIT_UNAVAILABLE,
    Kind.UPSTREAM: EXIT_UNAVAILABLE,
    Kind.IN_USE: EXIT_IN_USE,
}


def exit_code(exc: BaseException) -> int:
    kind = kind_of(exc)
    return EXIT_REFUSED if kind is None else EXIT_OF_KIND.get(kind, EXIT_REFUSED)


def settings() -> Settings:
    return Settings.from_env()


def fail(code: str, message: str, exit_code: int = EXIT_REFUSED) -> typer.Exit:
    err_console.print(
        f"[bold red]error[/] {escape(f'[{code}]')} {escape(message)}", markup=True, highlight=False
    )
    return typer.Exit(exit_code)


def cli_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the station's typed errors into one clear line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except StationError as exc:
            raise fail(exc.code, exc.message, exit_code(exc)) from None
        except HsmError as exc:
            raise fail(exc.code, str(exc), exit_code(exc)) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)

    return wrapper
