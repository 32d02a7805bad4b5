"""`station demo` end to end in a subprocess, on a fresh data directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Until tests/conftest.py registers station.cli.line_cmds in the CLI, run the app
# with the line commands mounted explicitly.
RUNNER = """
from station.cli import app, register
register.register_all(app)
if "station.cli.line_cmds" not in register.MODULES:
    from station.cli import line_cmds
    line_cmds.register(app)
app()
"""


def test_demo_provisions_both_batches_and_passes_every_check(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STATION_", "SOFTHSM2_"))}
    env["COLUMNS"] = "200"
    data_dir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, "demo", "--data-dir", str(data_dir), "--boards", "3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Batch summary" in output
    assert "board-ecc" in output and "see-rsa" in output
    assert "3/3" in output  # openssl verify and mTLS for the board-ecc batch
    assert "n/a (SE key: proof only)" in output
    assert "demo passed" in output
    assert (data_dir / "ca.pem").exists()
    assert (data_dir / "line-status.json").exists()
