"""Opening the ledger: a database that cannot be reached is one clear error, not a traceback."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, NoSuchModuleError

from station.errors import ConfigurationError, UnavailableError


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def ledger_errors(url: str) -> Iterator[None]:
    """Translate what opening ``url`` can raise into the station's vocabulary.

    The URL is shown without its password. A missing driver or an unknown
    dialect is a setting to fix (``bad-setting``); a server that refuses or does
    not answer, or a SQLite file that cannot be opened, is ``ledger-unreachable``.
    """
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        yield
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise ConfigurationError(
            f"STATION_DATABASE_URL: no database driver for {shown} ({_first_line(exc)})",
            code="bad-setting",
        ) from None
    except (DBAPIError, sqlite3.Error, OSError) as exc:
        raise UnavailableError(
            f"cannot open the ledger at {shown}: {_first_line(exc)}", code="ledger-unreachable"
        ) from None
