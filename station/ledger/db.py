"""Engines, migrations and the write transaction of the ledger.

SQLite (the default, one file in the data directory) runs in WAL mode with
foreign keys on; every write transaction starts with ``BEGIN IMMEDIATE`` so
writers queue on the database lock instead of failing on upgrade. PostgreSQL
(several stations, one ledger) serialises writers on a transaction-level
advisory lock, which is also what keeps the audit chain linear.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

# Any constant works; it only has to be the same for every station.
WRITE_LOCK_KEY = 0x5354_4C45  # "STLE"

_LOCK_SQL = f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"

_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the ledger's connection settings applied."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": 30.0, "check_same_thread": False}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take over transaction control from the sqlite3 module, so that BEGIN
        # is emitted by us (IMMEDIATE for writes).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        # FULL: a committed certificate survives power loss, not only a crash.
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("ledger_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(engine: Engine) -> threading.RLock:
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.get(engine)
        if lock is None:
            lock = _WRITE_LOCKS[engine] = threading.RLock()
        return lock


@contextlib.contextmanager
def write_transaction(engine: Engine, *, durable: bool = True) -> Iterator[Connection]:
    """One serialised write transaction: commits on success, rolls back on error.

    ``durable=False`` (SQLite only) commits without syncing the WAL to disk: the
    transaction survives a crash of the station but maybe not a power cut. The
    next durable commit syncs it along with its own (same WAL file), so a
    certificate is never returned before what led to it is on disk. Issuance
    uses it for the intent: losing an intent in a power cut loses nothing that
    ever left the station. On PostgreSQL the same is ``synchronous_commit = off``
    for that transaction: a later synchronous commit flushes the WAL past it.

    Writers of this process queue on a lock of their own before asking the
    database for its write lock, so a waiting thread is woken the moment the
    writer before it is done instead of sleeping in SQLite's busy handler.
    """
    with _write_lock(engine), engine.connect() as conn:
        conn = conn.execution_options(ledger_write=True)
        relaxed = not durable and engine.dialect.name == "sqlite"
        # On the driver connection: SQLAlchemy would wrap the PRAGMA in a transaction.
        raw = conn.connection.driver_connection if relaxed else None
        if raw is not None:
            raw.execute("PRAGMA synchronous=NORMAL")
        try:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.exec_driver_sql(_LOCK_SQL)
                    if not durable:
                        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                yield conn
        finally:
            if raw is not None:
                raw.execute("PRAGMA synchronous=FULL")


def alembic_config(connection: Connection | None = None) -> Any:
    """The Alembic configuration shipped inside the package (``station/migrations``)."""
    from alembic.config import Config

    cfg = Config(str(_MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` (idempotent; safe with several stations)."""
    from alembic import command

    if revision == "head" and current_revision(engine) == head_revision():
        return
    with engine.connect() as conn:
        conn = conn.execution_options(ledger_write=True)
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")
            command.upgrade(alembic_config(conn), revision)


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
