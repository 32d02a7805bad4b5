"""The ledger's hot statements, run on the database driver's own cursor.

Issuing one certificate takes about a dozen statements. Through SQLAlchemy
Core each pays for a compiled-cache lookup, parameter processing, an execution
context and events before the driver sees it, which made the ledger, not the
HSM, the limit of the issue path (docs/benchmarks.md has the figures). The hot path
(issuance, the line's steps, the audit log) therefore runs fixed SQL text on
the driver's cursor of the *same* connection, inside the transaction
SQLAlchemy opened: same transaction, same savepoints, same locks.

What SQLAlchemy did for us is done here, once per statement or per value:

* parameters are written ``:name`` and rewritten to ``%(name)s`` for psycopg;
* timestamps are written as SQLAlchemy writes them (on SQLite, the text its
  ``DATETIME`` type stores and parses back; a test holds the two equal);
* driver errors become SQLAlchemy's (``IntegrityError``, ``OperationalError``),
  which is what the callers catch.

Everything else (schema, migrations, listings, reports) stays on SQLAlchemy.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from station.ledger.schema import TS

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    return _PARAM.sub(r"%(\1)s", sql)


def _sqlite_ts(value: datetime | None) -> str | None:
    """SQLAlchemy's SQLite DATETIME text (wall-clock fields, zone dropped), at C speed."""
    if value is None:
        return None
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


@functools.lru_cache(maxsize=8)
def _ts_processor(dialect: Dialect) -> Callable[[datetime | None], Any]:
    if dialect.name == "sqlite":
        return _sqlite_ts
    process = TS.dialect_impl(dialect).bind_processor(dialect)
    if process is None:
        return lambda value: value
    return process


class Raw:
    """Statements on the driver cursor of ``conn`` (inside its transaction)."""

    __slots__ = ("_cur", "_dbapi_error", "_dialect", "_pg", "ts")

    def __init__(self, conn: Connection) -> None:
        dialect = conn.dialect
        self._dialect = dialect
        self._pg = dialect.name == "postgresql"
        self._dbapi_error: type[Exception] = dialect.dbapi.Error  # type: ignore[union-attr]
        dbapi_conn = conn.connection.dbapi_connection
        assert dbapi_conn is not None
        self._cur = dbapi_conn.cursor()
        self.ts = _ts_processor(dialect)

    def run(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """Execute; returns the driver cursor (``rowcount``, ``fetchone``...)."""
        text = _pyformat(sql) if self._pg else sql
        try:
            self._cur.execute(text, params or {})
        except self._dbapi_error as exc:
            raise DBAPIError.instance(
                text, params, exc, self._dbapi_error, dialect=self._dialect
            ) from exc
        return self._cur

    def first(self, sql: str, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The first row, keyed by column name (or alias): rows are never read by position."""
        cur = self.run(sql, params)
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d[0] for d in cur.description], row, strict=True))

    def first_of(self, stmt: Select[Any], params: Mapping[str, Any]) -> dict[str, Any] | None:
        """:meth:`first` for a select written in SQLAlchemy (see :func:`compiled`)."""
        sql, fixed = compiled(stmt, self._dialect)
        return self.first(sql, {**fixed, **params})

    def value(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row (``INSERT ... RETURNING id``)."""
        row = self.run(sql, params).fetchone()
        assert row is not None, sql
        return row[0]


@functools.lru_cache(maxsize=64)
def compiled(stmt: Select[Any], dialect: Dialect) -> tuple[str, dict[str, Any]]:
    """A SQLAlchemy select as the driver's SQL text and its fixed parameters,
    compiled once per dialect.

    For a hot read whose SQL should be written once, from the table metadata;
    the parameters a caller gives must be named (``bindparam("device_id")``).
    Compiled with the ``:name`` parameter style :meth:`Raw.run` takes on every driver.
    """
    named: Dialect = type(dialect)(paramstyle="named")  # type: ignore[call-arg]
    text = stmt.compile(dialect=named)
    fixed = {k: v for k, v in text.params.items() if v is not None}
    return str(text), fixed
