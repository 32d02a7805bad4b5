"""The whitelist export streams: memory does not grow with the number of boards."""

from __future__ import annotations

import csv
import io
import itertools
import tracemalloc

from bench.ledger import _Sink, bulk_whitelist
from station.cli.ledger_cmds import write_csv, write_json
from station.ledger import Ledger


def peak_bytes(ledger: Ledger, rows: int) -> int:
    entries = ledger.whitelist()
    tracemalloc.start()
    try:
        assert write_csv(itertools.islice(entries, rows), _Sink()) == rows
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        entries.close()  # type: ignore[attr-defined]


def test_export_memory_is_flat_in_the_number_of_rows(ledger_url: str) -> None:
    n = 10_000
    with Ledger(ledger_url, "test-station") as led:
        bulk_whitelist(led, n)
        small, large = peak_bytes(led, n // 10), peak_bytes(led, n)
        assert large < small * 1.5 + 256 * 1024, (small, large)

        out = io.StringIO()
        assert write_csv(led.whitelist("export"), out) == n
        rows = list(csv.DictReader(io.StringIO(out.getvalue())))
        assert len({r["serial"] for r in rows}) == n
        assert all(r["serial"] == r["serial"].lower() and r["batch"] == "export" for r in rows)


def test_json_export_of_nothing_is_an_empty_array(ledger_url: str) -> None:
    import json

    with Ledger(ledger_url, "test-station") as led:
        out = io.StringIO()
        assert write_json(led.whitelist(), out) == 0
        assert json.loads(out.getvalue()) == []
