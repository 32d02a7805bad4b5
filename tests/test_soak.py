"""A short soak of `station serve --workers 2` (bench/soak.py, ~25 s of load).

Checks memory and bookkeeping, never speed: no request fails, every certificate a
client was given is in the ledger, both workers live through it, and neither
worker's RSS grows by more than a generous bound after warm-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROWTH_BOUND_MIB = 50.0


def test_soak_no_errors_every_serial_in_ledger_flat_memory(tmp_path: Path) -> None:
    plot = tmp_path / "soak.png"
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.4",
         "--warmup", "6", "--sample", "1", "--plot", str(plot), "--json"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["errors"] == {}
    assert report["ok"] > 0
    assert report["certificates_issued"] == report["ok"] == report["unique_serials"]
    assert report["serials_in_ledger"] == report["certificates_issued"]
    assert report["server_alive_at_end"]
    # Two workers for the whole run: a restarted worker would show a third pid.
    assert len(report["worker_pids_seen"]) == 2, report["worker_pids_seen"]
    for name, rss in report["rss"].items():
        assert rss["samples"] >= 10, (name, rss)
        assert rss["growth_after_warmup_mib"] < GROWTH_BOUND_MIB, (name, rss)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
