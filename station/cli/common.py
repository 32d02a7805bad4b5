"""What every CLI command shares: settings, one-line errors, exit codes."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

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

# Exit codes: 1 a refusal by policy or ledger, 2 usage (typer's own), 3 not
# configured or the HSM unusable.
EXIT_REFUSED = 1
EXIT_UNAVAILABLE = 3

# The one place an error kind becomes an exit code: 3 when an operator must fix
# the station or something it depends on, 1 for every refusal of the request.
_EXIT_UNAVAILABLE_KINDS = frozenset({Kind.UNAVAILABLE, Kind.UPSTREAM, Kind.NOT_CONFIGURED})


def exit_code(exc: BaseException) -> int:
    return EXIT_UNAVAILABLE if kind_of(exc) in _EXIT_UNAVAILABLE_KINDS else EXIT_REFUSED


def settings() -> Settings:
    return Settings()


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
