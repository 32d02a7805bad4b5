"""Group commit: concurrent issuers share commits, and one refusal fails alone."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Connection, Integer, MetaData, String, Table, insert, select

from station.ca import CertificateAuthority
from station.errors import StationError
from station.ledger import Ledger
from station.ledger.checkpoint import WalCheckpointer
from station.ledger.db import make_engine, write_gate
from station.ledger.groupcommit import GroupCommitter
from tests.test_ledger import TEMPLATE, make_csr

meta = MetaData()
things = Table("things", meta, Column("id", Integer, primary_key=True), Column("name", String))


@pytest.fixture
def committer(tmp_path) -> Iterator[GroupCommitter]:
    engine = make_engine(f"sqlite:///{tmp_path / 'g.sqlite'}")
    meta.create_all(engine)
    yield GroupCommitter(engine)
    engine.dispose()


def names(committer: GroupCommitter) -> list[str]:
    with committer._engine.connect() as conn:
        return sorted(r[0] for r in conn.execute(select(things.c.name)))


def test_a_failing_job_is_rolled_back_alone(committer: GroupCommitter) -> None:
    start = threading.Barrier(9)
    errors: list[BaseException] = []

    def job(name: str) -> None:
        def write(conn: Connection) -> str:
            conn.execute(insert(things).values(name=name))
            if name == "bad":
                raise StationError("refused", code="test-refusal")
            return name

        start.wait()
        try:
            assert committer.submit(write, durable=True) == name
        except StationError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(n,)) for n in ["bad", *map(str, range(8))]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.code for e in errors] == ["test-refusal"]  # type: ignore[attr-defined]
    assert names(committer) == sorted(map(str, range(8)))


def test_a_lone_caller_commits_at_once(committer: GroupCommitter) -> None:
    committer.submit(lambda c: c.execute(insert(things).values(name="x")), durable=True)
    assert (committer.groups, committer.jobs) == (1, 1)
    assert names(committer) == ["x"]


def test_concurrent_issuers_share_commits_and_lose_nothing(
    ledger_url: str, ca: CertificateAuthority
) -> None:
    with Ledger(ledger_url, "gc") as led:
        led.create_batch(
            "B", product="p", planned_count=500, key_mode="board-ecc", subject_template=TEMPLATE
        )
        csrs = {f"dev-{i}": make_csr(f"dev-{i}")[0] for i in range(96)}
        returned: list[int] = []
        lock = threading.Lock()

        def work(ids: list[str]) -> None:
            for device_id in ids:
                serial = led.issue("B", device_id, csrs[device_id], ca).serial
                with lock:
                    returned.append(serial)

        ids = sorted(csrs)
        threads = [threading.Thread(target=work, args=(ids[i::12],)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(returned) == len(set(returned)) == 96
        assert sorted(int(e.serial, 16) for e in led.whitelist()) == []  # none verified yet
        assert led.counts() == {"B": {"issued": 96}}
        assert {c.serial for d in ids for c in led.certificates(d)} == {
            format(s, "x") for s in returned
        }
        assert led.audit_verify() is None
        # 96 intents + 96 certificates went through fewer transactions than writes.
        assert led._writes.jobs == 192 and led._writes.groups < 192


def test_durable_results_wait_for_a_sync_that_covers_them(committer: GroupCommitter) -> None:
    """On SQLite the WAL is synced after the write lock; no durable result leaves before it."""
    assert committer._pipelined
    start = threading.Barrier(12)
    late: list[tuple[int, int]] = []

    def job(n: int) -> None:
        def write(conn: Connection) -> int:
            conn.execute(insert(things).values(name=f"{n}"))
            return committer._commit_no + 1  # this group's commit number (commits are serial)

        start.wait()
        for _ in range(8):
            mine = committer.submit(write, durable=True)
            if committer._synced_no < mine:
                late.append((mine, committer._synced_no))

    threads = [threading.Thread(target=job, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert late == []
    assert len(names(committer)) == 96
    # One sync covers every group that committed while the one before it ran.
    assert 1 <= committer.syncs <= committer.groups


def test_non_durable_writes_do_not_sync(committer: GroupCommitter) -> None:
    for i in range(5):
        committer.submit(
            lambda c, i=i: c.execute(insert(things).values(name=f"{i}")), durable=False
        )
    assert committer.syncs == 0 and len(names(committer)) == 5


def _broken_disk(_engine: object) -> None:
    # A disk that fails fdatasync cannot be made here; the fault is injected at
    # the one call that would see it.
    raise OSError(5, "Input/output error")


def test_a_failed_sync_fails_every_job_of_its_group(
    committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_sync, release = threading.Event(), threading.Event()

    def slow_then_broken(engine: object) -> None:
        in_sync.set()
        release.wait(10)
        _broken_disk(engine)

    monkeypatch.setattr("station.ledger.groupcommit.sync_log", slow_then_broken)
    errors: list[str] = []

    def write(name: str) -> None:
        try:
            committer.submit(lambda c: c.execute(insert(things).values(name=name)), durable=True)
        except StationError as exc:
            errors.append(exc.code)

    first = threading.Thread(target=write, args=("first",))
    first.start()
    assert in_sync.wait(10)
    # Committed while the failing sync runs: their sync would come next.
    others = [threading.Thread(target=write, args=(f"w{i}",)) for i in range(4)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 10
    while committer._commit_no < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # until a second group has committed and waits for that sync
    assert committer._commit_no >= 2
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert errors == ["ledger-sync-failed"] * 5
    assert committer.syncs == 0


def test_after_a_failed_sync_nothing_more_is_written_until_restart(
    committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux may drop the pages a failed fdatasync could not write and say so once:
    a later sync that succeeds proves nothing about them. So the ledger stops
    writing, as PostgreSQL does, until it is opened again."""
    monkeypatch.setattr("station.ledger.groupcommit.sync_log", _broken_disk)
    with pytest.raises(StationError) as info:
        committer.submit(lambda c: c.execute(insert(things).values(name="x")), durable=True)
    assert info.value.code == "ledger-sync-failed"
    assert "Input/output error" in str(info.value)
    monkeypatch.undo()  # the disk answers again
    for durable in (True, False):
        with pytest.raises(StationError) as again:
            committer.submit(lambda c: c.execute(insert(things).values(name="y")), durable=durable)
        assert again.value.code == "ledger-sync-failed"
        assert "restarted" in str(again.value)
    assert names(committer) == ["x"]  # committed before its sync failed; nothing after
    restarted = GroupCommitter(committer._engine)
    restarted.submit(lambda c: c.execute(insert(things).values(name="z")), durable=True)
    assert restarted.syncs == 1 and names(committer) == ["x", "z"]
    restarted.close()


def test_a_sync_failing_otherwise_than_oserror_fails_its_group_too(
    committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def odd(_engine: object) -> None:
        raise RuntimeError("not an OSError")

    monkeypatch.setattr("station.ledger.groupcommit.sync_log", odd)
    with pytest.raises(StationError) as info:
        committer.submit(lambda c: c.execute(insert(things).values(name="x")), durable=True)
    assert info.value.code == "ledger-sync-failed" and "not an OSError" in str(info.value)


def _write_held_in_sync(
    committer: GroupCommitter,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    hold: Callable[[], object],
) -> tuple[threading.Thread, threading.Event]:
    """A durable write on a thread of its own, held inside its log sync by ``hold()``.

    Returns once the write is in its sync (later syncs are real ones): the thread,
    and an Event set when its own sync has ended.
    """
    from station.ledger import groupcommit

    real = groupcommit.sync_log
    in_sync, synced = threading.Event(), threading.Event()

    def held(engine: object) -> None:
        in_sync.set()
        hold()
        real(engine)  # type: ignore[arg-type]
        synced.set()

    monkeypatch.setattr("station.ledger.groupcommit.sync_log", held)
    writer = threading.Thread(
        target=committer.submit,
        args=(lambda c: c.execute(insert(things).values(name=name)),),
        kwargs={"durable": True},
    )
    writer.start()
    assert in_sync.wait(10)
    monkeypatch.setattr("station.ledger.groupcommit.sync_log", real)
    return writer, synced


def test_close_waits_for_a_group_still_syncing(
    committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checkpointers of ledgers other tests of this worker process left open are not
    # this committer's: only one it started may not outlive its close().
    others = [t for t in threading.enumerate() if t.name == "ledger-checkpoint"]
    writer, synced = _write_held_in_sync(committer, monkeypatch, "x", lambda: time.sleep(0.5))
    committer.close()
    assert synced.is_set()  # close() returned after the sync, not during it
    writer.join(10)
    assert not [
        t for t in threading.enumerate() if t.name == "ledger-checkpoint" and t not in others
    ]


def test_a_child_forked_while_a_thread_syncs_writes_on_its_own(
    committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child has none of its parent's other threads: a sync, a lead or a lock
    one of them had when the process forked would never end there."""
    release = threading.Event()
    writer, _synced = _write_held_in_sync(
        committer, monkeypatch, "parent", lambda: release.wait(10)
    )
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        status = 3
        try:
            done = threading.Event()

            def child_write() -> None:
                committer.submit(
                    lambda c: c.execute(insert(things).values(name="child")), durable=True
                )
                done.set()

            threading.Thread(target=child_write, daemon=True).start()
            status = 0 if done.wait(10) else 1
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    release.set()
    writer.join(10)
    assert os.waitstatus_to_exitcode(status) == 0, "1: the child's write never finished"
    assert names(committer) == ["child", "parent"]


def test_postgresql_commits_synchronously_inside_the_lock(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        assert not GroupCommitter(engine)._pipelined
    finally:
        engine.dispose()


def test_a_forked_child_queues_at_its_parents_write_gate(tmp_path: Path) -> None:
    """flock belongs to the open file: a child still using its parent's descriptor
    would be let in while the parent holds the gate. The gate opens its own in the
    child (fork_generation), so the child waits until the parent leaves."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    gate = write_gate(engine)
    with gate:  # the parent's lock file is open from here on
        pass
    go_r, go_w = os.pipe()  # parent -> child
    done_r, done_w = os.pipe()  # child -> parent
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        status = 3
        try:
            os.read(go_r, 1)  # the parent holds the gate now
            entered = threading.Event()

            def enter() -> None:
                with gate:
                    entered.set()

            thread = threading.Thread(target=enter, daemon=True)
            thread.start()
            early = entered.wait(0.5)  # the parent holds the gate all this time
            os.write(done_w, b"x")
            os.read(go_r, 1)  # the parent has left the gate
            status = 1 if early else (0 if entered.wait(10) else 2)
        finally:
            os._exit(status)
    with gate:
        os.write(go_w, b"x")
        os.read(done_r, 1)  # held until the child's window has passed
    os.write(go_w, b"x")
    _, status = os.waitpid(pid, 0)
    for fd in (go_r, go_w, done_r, done_w):
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, "1: let in while the parent held the gate"
    engine.dispose()


def _pragma(conn: Connection, name: str) -> int:
    return int(conn.exec_driver_sql(f"PRAGMA {name}").scalar_one())


def test_the_kept_connection_leaves_checkpoints_to_the_checkpointer(
    committer: GroupCommitter,
) -> None:
    """Off while the committer keeps the connection, SQLite's default again in the pool."""
    committer.submit(lambda c: _pragma(c, "wal_autocheckpoint"), durable=True)
    assert committer.submit(lambda c: _pragma(c, "wal_autocheckpoint"), durable=True) == 0
    committer.close()
    with committer._engine.connect() as conn:
        assert _pragma(conn, "wal_autocheckpoint") == 1000
        assert _pragma(conn, "synchronous") == 2  # FULL


def test_sustained_writers_keep_the_wal_bounded(tmp_path: Path) -> None:
    """Checkpoints run beside the writers; past the limit one catches up at the gate,
    and the WAL starts over instead of growing with everything ever written."""
    engine = make_engine(f"sqlite:///{tmp_path / 'g.sqlite'}")
    meta.create_all(engine)
    committer = GroupCommitter(engine)
    assert committer.checkpointer is not None
    committer.checkpointer = WalCheckpointer(engine, every=4, frames_limit=300)
    row = "x" * 3000  # about a page each

    def work(n: int) -> None:
        for i in range(250):
            committer.submit(
                lambda c, i=i: c.execute(insert(things).values(name=f"{n}-{i}-{row}")),
                durable=True,
            )

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    checkpointer = committer.checkpointer
    committer.close()
    assert len(names(committer)) == 2000
    assert checkpointer.passes > 0 and checkpointer.gated > 0
    # 2,000 rows of a page each (some 2,900 WAL pages without the catch-ups) went
    # through a WAL that never held half of them.
    wal_pages = os.path.getsize(tmp_path / "g.sqlite-wal") / 4096
    assert wal_pages < 1000, wal_pages
    engine.dispose()


def test_a_checkpoint_takes_the_write_gate_only_past_the_limit(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'g.sqlite'}")
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(things), [{"name": "x" * 3000} for _ in range(50)])
    conn_ = sqlite3.connect(tmp_path / "g.sqlite", isolation_level=None, check_same_thread=False)

    def run_while_gate_held(checkpointer: WalCheckpointer, window: float) -> bool:
        """Whether a checkpoint finishes within ``window`` seconds while another
        thread holds the write gate."""
        holding, release, done = threading.Event(), threading.Event(), threading.Event()

        def hold() -> None:
            with write_gate(engine):
                holding.set()
                release.wait(10)

        def checkpoint() -> None:
            checkpointer.checkpoint(conn_)
            done.set()

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        assert holding.wait(10)
        worker = threading.Thread(target=checkpoint, daemon=True)
        worker.start()
        finished = done.wait(window)
        release.set()
        holder.join(10)
        worker.join(10)
        assert done.is_set()
        return finished

    assert run_while_gate_held(WalCheckpointer(engine, frames_limit=10_000), 30) is True
    with engine.begin() as conn:  # frames again for the next pass
        conn.execute(insert(things), [{"name": "y" * 3000} for _ in range(50)])
    assert run_while_gate_held(WalCheckpointer(engine, frames_limit=10), 1) is False
    conn_.close()
    engine.dispose()


def test_a_closed_committer_checkpoints_again_when_reused(committer: GroupCommitter) -> None:
    checkpointer = committer.checkpointer = WalCheckpointer(committer._engine, every=2)
    before = 0
    for round_ in ("first", "reused"):
        for i in range(6):
            name = f"{round_}-{i}"
            committer.submit(
                lambda c, name=name: c.execute(insert(things).values(name=name)), durable=True
            )
        deadline = time.monotonic() + 10
        while checkpointer.passes == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert checkpointer.passes > before, round_
        before = checkpointer.passes
        committer.close()


def test_a_certificate_asked_for_again_leaves_only_once_on_disk(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same board and key get their certificate back, read from the ledger: a row
    another station process committed but could not sync is not handed out unsynced."""
    from station.ledger import groupcommit

    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    csr = make_csr("dev-1")[0]
    real = groupcommit.sync_log
    with Ledger(url, "worker-1") as first:
        first.create_batch(
            "B", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        monkeypatch.setattr("station.ledger.groupcommit.sync_log", _broken_disk)
        for _ in range(2):  # the board retries the 503 at the same worker
            with pytest.raises(StationError) as info:
                first.issue("B", "dev-1", csr, ca)
            assert info.value.code == "ledger-sync-failed"
    syncs: list[int] = []

    def counted(engine: object) -> None:
        real(engine)  # type: ignore[arg-type]
        syncs.append(1)

    monkeypatch.setattr("station.ledger.groupcommit.sync_log", counted)
    with Ledger(url, "worker-2") as second:  # then at another worker, whose disk syncs
        again = second.issue("B", "dev-1", csr, ca)
        assert again.reused
        assert syncs, "handed back without a sync covering the row it read"
