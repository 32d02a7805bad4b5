"""QA report of a big batch: time and peak memory of each format, CSV as the baseline.

N boards (default 100,000) are bulk-inserted into a SQLite ledger (as
tests/test_report_scale.py does: no HSM, the report only reads the ledger),
then each format is rendered in a fresh process so its peak RSS is its own:

  * csv: the device table streamed row by row (the flat-memory baseline);
  * html: the summary (one streamed pass) and the Jinja2 template, device table
    capped at HTML_MAX_ROWS;
  * pdf: the same template laid out by WeasyPrint, device table capped at
    PDF_MAX_ROWS (and at --pdf-rows, to show how memory follows the cap);
  * summary: build_report alone (what every format pays first).

    python bench/report.py [--count 100000] [--pdf-rows 250] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_CHILD = """
import io, json, sys, time
from station.ledger import Ledger
from station.report import build_report, iter_csv, render_html, render_pdf

url, fmt, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
led = Ledger(url, "bench", migrate=False)
t0 = time.perf_counter()
report = build_report(led, "BIG", None)
size = 0
if fmt == "csv":
    size = sum(len(c) for c in iter_csv(led, report))
elif fmt == "html":
    size = len(render_html(led, report))
elif fmt == "pdf":
    buf = io.BytesIO()
    render_pdf(led, report, buf, **({"max_rows": rows} if rows >= 0 else {}))
    size = len(buf.getvalue())
elapsed = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child would
# inherit the high-water mark of the parent that filled the ledger.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": round(elapsed, 2), "bytes": size, "peak_mb": round(hwm / 1024, 1)}))
"""


def child(url: str, fmt: str, rows: int = -1) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, url, fmt, str(rows)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--pdf-rows", type=int, default=250, help="a smaller PDF cap, too")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    from station.ledger import Ledger
    from station.report import PDF_MAX_ROWS
    from tests.test_report_scale import populate

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'ledger.sqlite'}"
        with Ledger(url, "bench") as led:
            populate(led, args.count)
        results = {
            "summary": child(url, "none"),
            "csv": child(url, "csv"),
            "html": child(url, "html"),
            f"pdf ({args.pdf_rows} rows)": child(url, "pdf", args.pdf_rows),
            f"pdf ({PDF_MAX_ROWS} rows)": child(url, "pdf"),
        }
    if args.json:
        print(json.dumps({"boards": args.count, **results}))
        return
    base = results["csv"]
    print(f"{args.count} boards")
    print(
        f"{'format':<18} {'seconds':>8} {'peak MB':>8} {'MB out':>8} {'time/csv':>9} {'mem/csv':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<18} {r['seconds']:>8} {r['peak_mb']:>8} {r['bytes'] / 1e6:>8.1f} "
            f"{r['seconds'] / base['seconds']:>9.2f} {r['peak_mb'] / base['peak_mb']:>8.2f}"
        )


if __name__ == "__main__":
    main()
