"""Engines, migrations and the write transaction of the ledger.

SQLite (the default, one file in the data directory) runs in WAL mode with
foreign keys on; every write transaction starts with ``BEGIN IMMEDIATE`` so
writers queue on the database lock instead of failing on upgrade. PostgreSQL
(several stations, one ledger) serialises writers on a transaction-level
advisory lock, which is also what keeps the audit chain linear.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from station.filemodes import private_dir, private_file, tighten

# Any constant works; it only has to be the same for every station.
WRITE_LOCK_KEY = 0x5354_4C45  # "STLE"

_LOCK_SQL = f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"

_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"

# Bumped in a forked child. What holds a per-process resource (the write gate's
# open lock file and its lock, the group committer's connection, locks and
# queue) compares this instead of calling getpid() on every transaction: a
# system call, several per certificate.
_fork_generation = 0
# Serialises taking those resources over in a child. Made anew in the child:
# a parent's thread may have held it when the process forked.
_adopt_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _fork_generation, _adopt_lock
    _fork_generation += 1
    _adopt_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def fork_generation() -> int:
    """Changes in a forked child; equal means "still the process that opened it"."""
    return _fork_generation


def adopt_lock() -> threading.Lock:
    """The lock under which an object re-makes its per-process state after a fork.

    A child has only the thread that forked: a lock that one of the parent's
    other threads held at that instant stays held for ever in the child, so
    such objects replace their locks before using them (double-checked against
    :func:`fork_generation` under this lock).
    """
    return _adopt_lock


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the ledger's connection settings applied."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_sqlite_files(Path(parsed.database))
        connect_args = {"timeout": 30.0, "check_same_thread": False}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine)
        if parsed.database and parsed.database != ":memory:":
            _switch_to_wal(engine, parsed.database, float(connect_args["timeout"]))
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _private_sqlite_files(database: Path) -> None:
    """The database file 0600 before SQLite opens it: SQLite gives its log (-wal) and
    shared-memory index (-shm) the database file's mode. A directory made here is
    0700; files of ours left looser by an older station are tightened."""
    if not database.parent.exists():
        private_dir(database.parent)
    private_file(database)
    for suffix in ("-wal", "-shm", "-journal", ".writelock"):
        tighten(Path(f"{database}{suffix}"))


def _switch_to_wal(engine: Engine, path: str, timeout: float) -> None:
    """Put a SQLite file in WAL mode once, one process at a time (at the write gate).

    The switch writes the file header, from inside the pragma's read
    transaction; SQLite refuses that upgrade at once ("database is locked",
    no busy wait) when another connection holds the file meanwhile, which is
    what processes starting together on a new ledger (the line's workers,
    ``station serve``'s) did to each other. WAL mode is persistent: once the
    file is in it, every connection's ``PRAGMA journal_mode=WAL`` is a no-op.
    """

    def mode(conn: sqlite3.Connection) -> str:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()

    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        if mode(conn) == "wal":
            return
        with write_gate(engine):
            if mode(conn) != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take over transaction control from the sqlite3 module, so that BEGIN
        # is emitted by us (IMMEDIATE for writes).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        # Statement journals in memory: on disk each was a file created and
        # unlinked in /var/tmp, some ten a second per loaded worker.
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.execute("PRAGMA busy_timeout=30000")
        # FULL: a committed certificate survives power loss, not only a crash.
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # On the driver connection: the same statement, without the cost of an
        # execution context (this runs twice per issued certificate).
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.execute(
            "BEGIN IMMEDIATE" if conn.get_execution_options().get("ledger_write") else "BEGIN"
        )


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


class _WriteGate:
    """Where this process's writers of one database queue, one at a time.

    Threads queue on an in-process lock. For a SQLite file, processes (the
    workers of ``station serve``, the line's processes, a CLI beside them)
    then queue on an ``flock`` of a file next to the database: the kernel wakes
    the next writer the moment the lock is free, where SQLite's busy handler
    would have it sleep and poll (1, 2, 5, ... 100 ms), which is what made
    latency spike when two workers shared one ledger. ``BEGIN IMMEDIATE`` and
    the busy timeout stay as the guard against writers that do not take the
    gate (the sqlite3 shell, older stations).
    """

    def __init__(self, lock_path: Path | None) -> None:
        self.lock = threading.RLock()
        self._path = lock_path
        self._fd: int | None = None
        self._gen = _fork_generation
        self._depth = 0

    def _adopt(self) -> None:
        """In a forked child: a lock, depth and open file of this process's own."""
        with adopt_lock():
            if self._gen == _fork_generation:
                return
            # The parent's RLock may be held by one of its threads, which the
            # child does not have. And flock locks belong to the open file, not
            # the process: on the parent's descriptor the child would be let in
            # while the parent holds the gate. (The inherited descriptor stays
            # open: closing it here could not release the parent's lock anyway.)
            self.lock = threading.RLock()
            self._depth = 0
            self._fd = None
            self._gen = _fork_generation

    def __enter__(self) -> None:
        if self._gen != _fork_generation:
            self._adopt()
        self.lock.acquire()
        if self._path is None:
            return
        try:
            if self._depth == 0:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        if self._gen != _fork_generation:
            return  # entered before this process forked: the parent's lock, not ours
        try:
            if self._path is not None:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self.lock.release()

    def close(self) -> None:
        if self._fd is not None and self._gen == _fork_generation:
            os.close(self._fd)
        self._fd = None


_GATES: weakref.WeakKeyDictionary[Engine, _WriteGate] = weakref.WeakKeyDictionary()
_GATES_GUARD = threading.Lock()


def write_gate(engine: Engine) -> _WriteGate:
    """The gate of ``engine``'s database (one per engine, made on first use)."""
    with _GATES_GUARD:
        gate = _GATES.get(engine)
        if gate is None:
            lock_path = None
            url = engine.url
            if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
                lock_path = Path(f"{url.database}.writelock")
            gate = _GATES[engine] = _WriteGate(lock_path)
            weakref.finalize(engine, gate.close)
        return gate


@contextlib.contextmanager
def write_transaction(
    engine: Engine, *, durable: bool = True, connection: Connection | None = None
) -> Iterator[Connection]:
    """One serialised write transaction: commits on success, rolls back on error.

    ``durable=False`` (SQLite only) commits without syncing the WAL to disk: the
    transaction survives a crash of the station but maybe not a power cut. The
    next durable commit syncs it along with its own (same WAL file), so a
    certificate is never returned before what led to it is on disk. Issuance
    uses it for the intent: losing an intent in a power cut loses nothing that
    ever left the station. On PostgreSQL the same is ``synchronous_commit = off``
    for that transaction: a later synchronous commit flushes the WAL past it.

    Writers queue at the database's write gate (see :class:`_WriteGate`) before
    asking the database for its write lock. ``connection`` lets a caller that
    writes often (the group committer) keep one connection instead of taking
    one from the pool every time.
    """
    with write_gate(engine):
        if connection is not None:
            yield from _transaction(engine, connection, durable)
        else:
            with engine.connect() as conn:
                yield from _transaction(engine, conn, durable)


def _transaction(engine: Engine, conn: Connection, durable: bool) -> Iterator[Connection]:
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


def pipelined_sync(engine: Engine) -> bool:
    """Whether writers may commit unsynced and call sync_log() after the lock (SQLite files)."""
    url = engine.url
    return url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")


def sync_log(engine: Engine) -> None:
    """Make every transaction committed so far on a SQLite file durable.

    In WAL mode a commit appends its frames to ``<db>-wal``; ``fsync`` of that
    file (``fdatasync``, as SQLite does) is what ``synchronous=FULL`` adds to each
    commit. Frames that a
    checkpoint already moved into the database were synced with it
    (``synchronous=NORMAL`` syncs the WAL before and the database after each
    checkpoint, and the WAL restarts only after a complete one). Without a WAL
    file (the last connection closed and checkpointed) the database file is
    synced instead, which costs the same and covers that case too.
    """
    path = engine.url.database
    assert path
    for name in (f"{path}-wal", path):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return


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
    # At the write gate: processes that start together on a new SQLite file (the
    # workers of `station serve`, of `station line run --processes`) migrate one
    # after the other, the later ones finding the schema in place.
    with write_gate(engine), engine.connect() as conn:
        conn = conn.execution_options(ledger_write=True)
        sqlite = engine.dialect.name == "sqlite"
        # SQLite: a migration in batch mode rebuilds a table (copy, DROP, rename), and
        # with foreign keys on, dropping certificates fails while the whitelist points
        # at it. SQLite's own recipe for altering a table: foreign keys off outside the
        # transaction (on the driver connection: SQLAlchemy would open one first),
        # PRAGMA foreign_key_check before the commit, on again after.
        raw = conn.connection.driver_connection if sqlite else None
        if raw is not None:
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")
                command.upgrade(alembic_config(conn), revision)
                if raw is not None:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"the migration broke foreign keys: {broken[:5]}")
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
