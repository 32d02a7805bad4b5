"""The hot path's statements on the driver cursor behave as SQLAlchemy's did (both databases)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from station.ca import CertificateAuthority
from station.errors import StationError
from station.ledger import Ledger
from station.ledger.db import write_transaction
from station.ledger.rawsql import Raw, _pyformat
from station.ledger.records import utc
from station.ledger.schema import batches
from tests.test_ledger import TEMPLATE, make_csr


def test_named_parameters_become_pyformat_and_casts_are_left_alone() -> None:
    sql = "SELECT :a, x::text, :b_2 FROM t WHERE y = :a"
    assert _pyformat(sql) == "SELECT %(a)s, x::text, %(b_2)s FROM t WHERE y = %(a)s"


def test_timestamps_written_raw_read_back_through_sqlalchemy(ledger_url: str) -> None:
    when = datetime(2026, 11, 29, 12, 30, 45, 123456, tzinfo=UTC)
    with Ledger(ledger_url, "raw") as led:
        with write_transaction(led.engine) as conn:
            raw = Raw(conn)
            raw.run(
                "INSERT INTO batches (name, product, planned_count, key_mode, subject_template, "
                "days, state, station_id, device_count, created_at) VALUES (:name, 'p', 1, "
                "'board-ecc', '*', 1, 'open', 'raw', 0, :at)",
                {"name": "R", "at": raw.ts(when)},
            )
        with led.engine.connect() as conn:
            stored = conn.execute(
                select(batches.c.created_at).where(batches.c.name == "R")
            ).scalar()
        assert utc(stored) == when
        assert led.get_batch("R").created_at == when
        # And a range query compares it as a time, not as some other text form.
        assert [b.name for b in led.list_batches() if b.created_at <= when] == ["R"]


def test_driver_errors_surface_as_sqlalchemy_errors(ledger_url: str) -> None:
    with Ledger(ledger_url, "raw") as led:
        led.create_batch(
            "B", product="p", planned_count=1, key_mode="board-ecc", subject_template="*"
        )
        with pytest.raises(IntegrityError), write_transaction(led.engine) as conn:
            Raw(conn).run(
                "INSERT INTO batches (name, product, planned_count, key_mode, subject_template, "
                "days, state, station_id, device_count, created_at) VALUES ('B', 'p', 1, "
                "'board-ecc', '*', 1, 'open', 'raw', 0, :at)",
                {"at": Raw(conn).ts(datetime.now(UTC))},
            )
        # Nothing recorded was lost with the refused write.
        assert led.get_batch("B").planned_count == 1
        assert led.audit_verify() is None


def test_sqlite_timestamp_text_is_sqlalchemys() -> None:
    from datetime import timedelta, timezone

    from sqlalchemy.dialects import sqlite

    from station.ledger.rawsql import _ts_processor
    from station.ledger.schema import TS

    dialect = sqlite.dialect()
    theirs = TS.dialect_impl(dialect).bind_processor(dialect)
    ours = _ts_processor(dialect)
    for value in (
        datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 6, 1, 0, 0, tzinfo=timezone(timedelta(hours=2))),
        datetime(2026, 6, 1, 0, 0),
        None,
    ):
        assert ours(value) == theirs(value), value


def test_a_step_hands_back_the_board_as_the_ledger_reads_it(ledger_url: str) -> None:
    with Ledger(ledger_url, "raw") as led:
        led.create_batch(
            "B", product="p", planned_count=2, key_mode="board-ecc", subject_template="*"
        )
        before = datetime.now(UTC)
        returned = led.mark_key_ready("board-1", batch="B")
        assert returned == led.get_device("board-1")
        assert returned.state == "key-ready" and returned.batch == "B"
        assert returned.key_ready_at is not None and returned.key_ready_at.tzinfo is UTC
        assert before <= returned.key_ready_at <= datetime.now(UTC)
        failed = led.mark_failed("board-1", "timeout", "no answer")
        assert (failed.state, failed.failure_code, failed.attempts) == ("failed", "timeout", 1)
        assert failed == led.get_device("board-1")


def test_a_subject_worked_out_before_the_lock_refuses_in_the_same_order(
    ledger_url: str, ca: CertificateAuthority
) -> None:
    """The subject is computed before the write lock from the template last seen; the
    batch's own refusals still come first, and the template read in the transaction wins."""
    with Ledger(ledger_url, "raw") as led:
        led.create_batch(
            "B", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        assert not led.issue("B", "dev-1", make_csr("dev-1")[0], ca).reused  # template seen
        wrong = make_csr("dev-2", org="other")[0]
        with pytest.raises(StationError) as info:
            led.issue("B", "dev-2", wrong, ca)
        assert info.value.code == "subject-mismatch"
        led.close_batch("B")
        with pytest.raises(StationError) as info:
            led.issue("B", "dev-2", wrong, ca)
        assert info.value.code == "batch-closed"
        # A stale template in the cache is not trusted: the one in the ledger decides.
        led.create_batch(
            "C", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        led._templates["C"] = "/O=other/CN={device_id}"
        result = led.issue("C", "dev-3", make_csr("dev-3")[0], ca)
        assert result.certificate.subject.rfc4514_string() == ("C=US,CN=dev-3,OU=team,O=company")
