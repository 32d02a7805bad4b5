"""Every benchmark runs end to end at a tiny size and prints its JSON.

Speed is not checked here (benchmarks measure it; see docs/benchmarks.md): this
only keeps `make bench` from rotting when the code under it changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RUNS = {
    "against_commit": [
        *("--base", "HEAD", "--rounds", "1", "--", "--count", "5", "--export-count", "50"),
        *("--no-pg", "--threads", "2", "--no-writer-estimate"),
    ],
    "issuance": [
        *("--count", "30", "--raw-count", "50", "--openssl-count", "2"),
        *("--module-seconds", "0.2"),
    ],
    "ledger": ["--count", "20", "--export-count", "200", "--no-pg", "--threads", "2"],
    "http_issuance": ["--duration", "1", "--workers", "1"],
    "est": ["--duration", "1", "--workers", "1", "--clients", "2"],
    "cmp": ["--count", "2", "--parallel", "2", "--workers", "1"],
    "line": ["--boards", "1", "--ports", "1,2", "--per-port", "1"],
    "line_load": ["--ports", "4", "--boards", "8", "--baud", "0"],
    "crash": ["--kills", "2", "--boards", "3", "--backend", "sqlite"],
    "soak": ["--minutes", "0.1", "--clients", "2"],
    "publish": ["--revoked", "300", "--duration", "0.5", "--clients", "4", "--rounds", "1"],
    "report": ["--count", "300", "--pdf-rows", "20"],
}


def test_every_benchmark_is_covered() -> None:
    assert {p.stem for p in (ROOT / "bench").glob("*.py")} == set(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_runs_and_prints_json(name: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}  # each makes its own
    env["TMPDIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *RUNS[name], "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert figures, result.stdout
