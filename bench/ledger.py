"""Issuance through the ledger against the bare issue path, and the whitelist export.

In one run, on one CA key in one SoftHSM token:
  * bare: CSR bytes -> parse -> policy -> certificate signed in the token -> chain PEM
    (bench/issuance.py's station path, no database);
  * ledger: Ledger.issue() on the same CSRs (every board its own key): intent committed,
    signed, certificate committed; SQLite file (WAL, synchronous=FULL) and PostgreSQL;
    once by one issuer, once by --threads concurrent issuers (as the serial ports and
    HTTP clients issue), who share commits;
  * whitelist export: N verified boards bulk-inserted (not through the HSM), then
    `whitelist export` as CSV: time, and peak Python memory (tracemalloc) at N and N/10
    to show it does not grow with N;
  * the floor: the ledger's own statements for --count certificates, recorded and then
    replayed on the bare sqlite3 driver (same transactions, same WAL syncs), to show how
    much of the ledger's cost is SQLite and the disk, and how much is Python;
  * an estimate for a design decision, not a station path: --threads issuers that send
    those recorded transactions to a writer process of their own and wait for each, as
    Ledger.issue() waits for its commits (what moving the writes out of the GIL gains).

PostgreSQL is --pg-url, or Debian's server started in a temporary directory.

    python bench/ledger.py [--count 1000] [--export-count 100000] [--json]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import secrets
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def make_csrs(n: int, prefix: str) -> list[tuple[str, bytes]]:
    """Every board its own key: the ledger refuses a key it has seen (duplicate-key)."""
    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        device = f"{prefix}-{i:06d}"
        name = x509.Name(
            [
                x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "company"),
                x509.NameAttribute(x509.NameOID.ORGANIZATIONAL_UNIT_NAME, "team"),
                x509.NameAttribute(x509.NameOID.COMMON_NAME, device),
                x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "US"),
            ]
        )
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        out.append((device, csr.public_bytes(serialization.Encoding.PEM)))
    return out


def rate(
    fn: Callable[[str, bytes], object], csrs: list[tuple[str, bytes]], threads: int = 1
) -> float:
    """Certificates per second, the CSRs shared out over `threads` concurrent issuers."""
    parts = [csrs[i::threads] for i in range(threads)]

    def work(part: list[tuple[str, bytes]]) -> None:
        for device, pem in part:
            fn(device, pem)

    t0 = time.perf_counter()
    if threads == 1:
        work(csrs)
    else:
        pool = [threading.Thread(target=work, args=(p,)) for p in parts]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    return len(csrs) / (time.perf_counter() - t0)


Transactions = list[tuple[bool, list[tuple[str, dict[str, Any]]]]]


def record_issue_sql(
    work: Path, ca: Any, csrs: list[tuple[str, bytes]]
) -> tuple[Transactions, Path]:
    """The statements Ledger.issue() runs for ``csrs``, transaction by transaction.

    Issued by one caller on a fresh SQLite file, so each transaction is one
    certificate's intent or its commit, in that order: (durable, [(sql, params)]).
    Also returns a second fresh file, made the same way, to replay them on.
    """
    from station.ledger import Ledger, groupcommit, rawsql

    txns: Transactions = []
    run_sql, run_group = rawsql.Raw.run, groupcommit.GroupCommitter._run

    recording: list[tuple[str, dict[str, Any]]] | None = None

    def record_sql(self: Any, sql: str, params: Any = None) -> Any:
        if recording is not None:  # inside a write transaction
            recording.append((sql, dict(params or {})))
        return run_sql(self, sql, params)

    def record_group(self: Any, group: list[Any]) -> int:
        nonlocal recording
        recording = []
        txns.append((any(job.durable for job in group), recording))
        try:
            return run_group(self, group)
        finally:
            recording = None

    def fresh(name: str) -> Ledger:
        led = Ledger(f"sqlite:///{work / name}", "bench")
        led.create_batch(
            "B",
            product="bench",
            planned_count=len(csrs) + 100,
            key_mode="board-ecc",
            subject_template=TEMPLATE,
        )
        return led

    stamp = secrets.token_hex(4)
    rawsql.Raw.run = record_sql  # type: ignore[method-assign]
    groupcommit.GroupCommitter._run = record_group  # type: ignore[method-assign]
    try:
        with fresh(f"recorded-{stamp}.sqlite") as led:
            for device, pem in csrs:
                led.issue("B", device, pem, ca)
    finally:
        rawsql.Raw.run = run_sql  # type: ignore[method-assign]
        groupcommit.GroupCommitter._run = run_group  # type: ignore[method-assign]
    assert len(txns) == 2 * len(csrs), "one intent and one commit per certificate"
    fresh(f"replayed-{stamp}.sqlite").close()
    return txns, work / f"replayed-{stamp}.sqlite"


def _replay_connection(path: Path, *, foreign_keys: bool = True) -> tuple[Any, int]:
    """A sqlite3 connection set up as the group committer's, and the WAL file to sync."""
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    if foreign_keys:
        conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("BEGIN IMMEDIATE")  # the WAL file exists from here on
    conn.execute("COMMIT")
    return conn, os.open(f"{path}-wal", os.O_RDONLY)


def sql_floor(work: Path, ca: Any, csrs: list[tuple[str, bytes]]) -> float:
    """Certificates per second of the ledger's own SQL alone, on the bare sqlite3 driver.

    The statements Ledger.issue() runs (with their parameters) are recorded on one
    SQLite file, transaction by transaction, then replayed on a fresh file made the
    same way, through sqlite3 with no ledger code in between: each certificate's
    two transactions, and the WAL sync (fdatasync) after the durable one, as the
    group committer does. What remains is SQLite's work and the disk's: the part
    of the ledger's cost no Python change can remove.
    """
    txns, path = record_issue_sql(work, ca, csrs)
    conn, wal = _replay_connection(path)
    try:
        t0 = time.perf_counter()
        for durable, statements in txns:
            conn.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                conn.execute(sql, params).fetchall()
            conn.execute("COMMIT")
            if durable:
                os.fdatasync(wal)
        seconds = time.perf_counter() - t0
    finally:
        os.close(wal)
        conn.close()
    return len(csrs) / seconds


def _writer_main(pipe: Any, path: str) -> None:
    """The estimate's writer process: replays jobs in shared transactions, one sync each.

    Group commit as the ledger does it, in a process of its own: every job waiting
    on the pipe joins the transaction (up to 64), each in a savepoint; one commit;
    one WAL sync if any job was durable; then the job numbers go back. Foreign keys
    are off: when issuers interleave, the rows get other ids than in the recording,
    which the recorded statements still name (the checks cost microseconds).
    """
    conn, wal = _replay_connection(Path(path), foreign_keys=False)
    pipe.send("ready")
    while (first := pipe.recv()) is not None:
        group = [first]
        while len(group) < 64 and pipe.poll(0):
            group.append(pipe.recv())
        conn.execute("BEGIN IMMEDIATE")
        for _number, _durable, statements in group:
            conn.execute("SAVEPOINT job")
            for sql, params in statements:
                conn.execute(sql, params).fetchall()
            conn.execute("RELEASE SAVEPOINT job")
        conn.execute("COMMIT")
        if any(durable for _n, durable, _s in group):
            os.fdatasync(wal)
        pipe.send([number for number, _d, _s in group])
    os.close(wal)
    conn.close()


def writer_process_estimate(
    work: Path, ca: Any, csrs: list[tuple[str, bytes]], threads: int
) -> tuple[float, float]:
    """What --threads issuers would reach if the ledger's writes ran in a process of their own.

    Not a station path: an estimate for a design decision. The issuers do what
    Ledger.issue() does outside its transactions (CSR checks, the public key's
    hash, the subject from the template, signing in the token, PEM and
    fingerprint) and send each certificate's two recorded transactions to a
    writer process, waiting for each to be committed (and the second synced)
    as Ledger.issue() does. The writer runs SQL only: the ledger's Python inside
    a transaction (checks, audit entries) would run there too, on the other
    core. Returns (certificates/s, issuing process CPU ms per certificate).
    """
    import multiprocessing

    from station.ca import DeviceProfile, new_serial
    from station.ledger.issuer import subject_for
    from station.policy import check_csr, load_csr, public_key_sha256

    txns, path = record_issue_sql(work, ca, csrs)
    jobs = [(txns[2 * i], txns[2 * i + 1]) for i in range(len(csrs))]
    mine, theirs = multiprocessing.Pipe()
    writer = multiprocessing.get_context("spawn").Process(
        target=_writer_main, args=(theirs, str(path)), daemon=True
    )
    writer.start()
    theirs.close()  # the writer's end: a writer that dies is then seen as end of file
    if mine.recv() != "ready":  # started and set up: its start-up is not timed
        raise RuntimeError("the estimate's writer process did not start")
    waiting: dict[int, threading.Lock] = {}
    send_lock = threading.Lock()
    numbers = itertools.count()
    writer_gone = threading.Event()

    def replies() -> None:
        while True:
            try:
                done = mine.recv()
            except (EOFError, OSError):
                writer_gone.set()
                for lock in list(waiting.values()):
                    lock.release()  # nobody waits for ever on a dead writer
                return
            for number in done:
                waiting.pop(number).release()

    def submit(durable: bool, statements: list[tuple[str, dict[str, Any]]]) -> None:
        done = threading.Lock()
        done.acquire()
        number = next(numbers)
        waiting[number] = done
        with send_lock:
            if writer_gone.is_set():
                raise RuntimeError("the estimate's writer process stopped")
            mine.send((number, durable, statements))
        done.acquire()
        if writer_gone.is_set():
            raise RuntimeError("the estimate's writer process stopped")

    profile = DeviceProfile()

    def issue(device: str, pem: bytes, job: tuple[tuple[bool, Any], tuple[bool, Any]]) -> bytes:
        csr = load_csr(pem)
        check_csr(csr)
        public_key_sha256(csr)
        csr.public_bytes(serialization.Encoding.DER)
        subject = subject_for(TEMPLATE, device, csr)
        submit(*job[0])  # the intent
        cert = ca.issue(csr, subject=subject, serial=new_serial(), profile=profile)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        cert.fingerprint(hashes.SHA256())
        submit(*job[1])  # the certificate, synced
        return cert_pem + ca.chain_pem

    reader = threading.Thread(target=replies, daemon=True)
    reader.start()
    by_device = {device: job for (device, _pem), job in zip(csrs, jobs, strict=True)}
    cpu0 = time.process_time()
    per_s = rate(lambda device, pem: issue(device, pem, by_device[device]), csrs, threads)
    cpu_ms = (time.process_time() - cpu0) / len(csrs) * 1e3
    with send_lock:
        mine.send(None)
    writer.join(30)
    mine.close()
    return per_s, cpu_ms


def bulk_whitelist(ledger: Any, n: int) -> None:
    """n verified boards with whitelisted certificates, inserted directly (no HSM)."""
    from station.ledger.schema import batches, certificates, devices, whitelist

    now = datetime.now(UTC)
    with ledger.engine.begin() as conn:
        batch_id = conn.execute(
            batches.insert().values(
                name="export",
                product="bench",
                planned_count=n,
                key_mode="board-ecc",
                subject_template=TEMPLATE,
                days=3650,
                state="open",
                station_id="bench",
                device_count=n,
                created_at=now,
            )
        ).inserted_primary_key[0]
        step = 10_000
        for start in range(0, n, step):
            ids = range(start, min(n, start + step))
            serials = {i: format(secrets.randbits(159) | 1 << 150, "x") for i in ids}
            conn.execute(
                devices.insert(),
                [
                    {
                        "id": i + 1,
                        "device_id": f"board-{i:07d}",
                        "batch_id": batch_id,
                        "state": "verified",
                        "attempts": 0,
                        "station_id": "bench",
                        "created_at": now,
                        "updated_at": now,
                        "verified_at": now,
                    }
                    for i in ids
                ],
            )
            conn.execute(
                certificates.insert(),
                [
                    {
                        "serial": serials[i],
                        "device_pk": i + 1,
                        "batch_id": batch_id,
                        "station_id": "bench",
                        "state": "issued",
                        "csr_der": b"\x30\x00",
                        "public_key_sha256": f"{i:064x}",
                        "subject": f"CN=board-{i:07d}",
                        "sign_time": now,
                        "days": 3650,
                        "backdate_seconds": 0,
                        "fingerprint": secrets.token_hex(32),
                        "not_before": now,
                        "not_after": now + timedelta(days=3650),
                        "created_at": now,
                        "issued_at": now,
                    }
                    for i in ids
                ],
            )
            conn.execute(
                whitelist.insert(),
                [
                    {
                        "serial": serials[i],
                        "device_pk": i + 1,
                        "batch_id": batch_id,
                        "added_at": now,
                    }
                    for i in ids
                ],
            )


class _Sink(io.TextIOBase):
    """Counts what the export writes and keeps none of it."""

    def __init__(self) -> None:
        self.chars = 0

    def write(self, s: str) -> int:
        self.chars += len(s)
        return len(s)


def export_figures(url: str, n: int) -> dict[str, float]:
    from station.cli.ledger_cmds import write_csv
    from station.ledger import Ledger

    with Ledger(url, "bench") as led:
        bulk_whitelist(led, n)
        sink = _Sink()
        t0 = time.perf_counter()
        rows = write_csv(led.whitelist(), sink)
        seconds = time.perf_counter() - t0
        assert rows == n
        peaks = {}
        for label, limit in (("all", n), ("tenth", n // 10)):
            tracemalloc.start()
            entries = led.whitelist()
            written = write_csv(itertools.islice(entries, limit), _Sink())
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            entries.close()  # type: ignore[attr-defined]
            assert written == limit
            peaks[label] = peak / 1e6
    return {
        "seconds": round(seconds, 2),
        "rows_per_s": round(n / seconds),
        "peak_mb": round(peaks["all"], 2),
        "peak_mb_tenth": round(peaks["tenth"], 2),
        "mb_written": round(sink.chars / 1e6, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="certificates per path")
    parser.add_argument("--export-count", type=int, default=100_000, help="whitelist size")
    parser.add_argument("--pg-url", help="PostgreSQL URL (default: start a temporary server)")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument(
        "--threads",
        type=int,
        default=8,
        help="concurrent issuers for the grouped-commit figure (ports or HTTP clients)",
    )
    parser.add_argument(
        "--no-writer-estimate",
        action="store_true",
        help="skip the estimate of ledger writes in a process of their own",
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()

    def say(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    os.environ.pop("SOFTHSM2_CONF", None)
    from station.ca import DeviceProfile, init_ca, new_serial
    from station.ledger import Ledger
    from station.policy import check_csr, load_csr
    from station.settings import Settings

    settings = Settings(data_dir=work, station_id="bench")
    ca = init_ca(settings).ca
    assert ca is not None
    profile = DeviceProfile()

    def bare(_device: str, pem: bytes) -> bytes:
        csr = load_csr(pem)
        check_csr(csr)
        cert = ca.issue(csr, subject=csr.subject, serial=new_serial(), profile=profile)
        return ca.chain_for(cert)

    pg_server = None
    urls = {"sqlite": f"sqlite:///{work / 'ledger.sqlite'}"}
    if args.pg_url:
        urls["postgresql"] = args.pg_url
    elif not args.no_pg:
        from tests.fixtures.pg import PgServer, _pg_bin

        bindir = _pg_bin()
        if bindir is not None:
            pg_root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
            pg_server = PgServer(bindir, pg_root)
            pg_server.start()
            pg_server.admin("CREATE DATABASE issue")
            pg_server.admin("CREATE DATABASE export")
            urls["postgresql"] = pg_server.url("issue")

    figures: dict[str, Any] = {"count": args.count, "key": "EC P-256 in SoftHSM2"}
    try:
        extra = 1 if args.no_writer_estimate else 2  # the floor, the estimate
        say(f"making {args.count * (2 + 2 * len(urls) + extra) + 50} CSRs (one key each)...")
        warm = make_csrs(50, "warm")
        for device, pem in warm:
            bare(device, pem)
        bare_rate = rate(bare, make_csrs(args.count, "bare"))
        figures["bare_certs_per_s"] = round(bare_rate, 1)
        say(f"bare issue path:            {bare_rate:8.1f} certificates/s")
        # The same path with --threads issuers: what threads cost in one process
        # (the GIL handed back and forth, the HSM's lock) before any ledger.
        bare_threaded = rate(bare, make_csrs(args.count, "bare-t"), args.threads)
        figures[f"bare_{args.threads}_threads_certs_per_s"] = round(bare_threaded, 1)
        say(f"bare issue path, {args.threads} issuers: {bare_threaded:8.1f} certificates/s")
        for kind, url in urls.items():
            with Ledger(url, "bench") as led:
                led.create_batch(
                    "B",
                    product="bench",
                    planned_count=10 * args.count + 100,
                    key_mode="board-ecc",
                    subject_template=TEMPLATE,
                )
                for device, pem in make_csrs(20, f"warm-{kind}"):
                    led.issue("B", device, pem, ca)
                csrs = make_csrs(args.count, kind)
                many = make_csrs(args.count, f"{kind}-t")

                def through_ledger(device: str, pem: bytes, led: Any = led) -> object:
                    return led.issue("B", device, pem, ca)

                ledger_rate = rate(through_ledger, csrs)
                groups0, jobs0 = led._writes.groups, led._writes.jobs
                grouped_rate = rate(through_ledger, many, args.threads)
                per_commit = (led._writes.jobs - jobs0) / max(1, led._writes.groups - groups0)
                assert led.audit_verify() is None
            figures[f"ledger_{kind}_certs_per_s"] = round(ledger_rate, 1)
            figures[f"ledger_{kind}_vs_bare"] = round(ledger_rate / bare_rate, 3)
            figures[f"ledger_{kind}_{args.threads}_threads_certs_per_s"] = round(grouped_rate, 1)
            figures[f"ledger_{kind}_{args.threads}_threads_vs_bare"] = round(
                grouped_rate / bare_rate, 3
            )
            figures[f"ledger_{kind}_{args.threads}_threads_vs_bare_threaded"] = round(
                grouped_rate / bare_threaded, 3
            )
            figures[f"ledger_{kind}_writes_per_commit"] = round(per_commit, 1)
            say(
                f"through the ledger, {kind + ':':<11} {ledger_rate:8.1f} certificates/s"
                f"  ({ledger_rate / bare_rate:.2f} of bare), one issuer"
            )
            say(
                f"through the ledger, {kind + ':':<11} {grouped_rate:8.1f} certificates/s"
                f"  ({grouped_rate / bare_rate:.2f} of bare, {grouped_rate / bare_threaded:.2f} "
                f"of bare with as many issuers), {args.threads} issuers, "
                f"{per_commit:.1f} writes per commit"
            )

        floor = sql_floor(work, ca, make_csrs(args.count, "floor"))
        in_series = 1 / (1 / bare_rate + 1 / floor)
        figures["ledger_sqlite_sql_alone_certs_per_s"] = round(floor, 1)
        figures["ledger_sqlite_floor_vs_bare"] = round(in_series / bare_rate, 3)
        say(
            f"the ledger's SQL alone, sqlite: {floor:8.1f} certificates/s (its statements, "
            "commits and syncs replayed on the bare driver); bare path and that in series: "
            f"{in_series / bare_rate:.2f} of bare, the best one issuer could reach"
        )

        if not args.no_writer_estimate:
            est, est_cpu = writer_process_estimate(
                work, ca, make_csrs(args.count, "writer"), args.threads
            )
            now_rate = figures[f"ledger_sqlite_{args.threads}_threads_certs_per_s"]
            figures[f"writer_process_estimate_{args.threads}_threads_certs_per_s"] = round(est, 1)
            figures["writer_process_estimate_vs_bare"] = round(est / bare_rate, 3)
            figures["writer_process_estimate_vs_ledger"] = round(est / now_rate, 3)
            figures["writer_process_estimate_issuer_cpu_ms"] = round(est_cpu, 3)
            say(
                f"estimate, ledger writes in a process of their own, {args.threads} issuers: "
                f"{est:8.1f} certificates/s ({est / bare_rate:.2f} of bare, "
                f"{est / now_rate:.2f}x the ledger today; issuing process "
                f"{est_cpu:.2f} ms CPU per certificate)"
            )

        n = args.export_count
        export_urls = {"sqlite": f"sqlite:///{work / 'export.sqlite'}"}
        if pg_server is not None:
            export_urls["postgresql"] = pg_server.url("export")
        elif args.pg_url:
            say("(export on PostgreSQL skipped with --pg-url: it needs an empty database)")
        for kind, url in export_urls.items():
            say(f"inserting {n} whitelisted boards ({kind})...")
            fig = export_figures(url, n)
            figures[f"export_{kind}"] = fig
            say(
                f"whitelist export, {n} rows, {kind + ':':<11} {fig['seconds']:6.2f} s "
                f"({fig['rows_per_s']} rows/s, {fig['mb_written']} MB CSV), peak "
                f"{fig['peak_mb']:.2f} MB (at {n // 10} rows: {fig['peak_mb_tenth']:.2f} MB)"
            )
    finally:
        if pg_server is not None:
            pg_server.stop()
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
