"""The README, `--help` and the Dockerfile say what the code does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from api.server import default_workers
from station.cli.common import EXIT_OF_KIND, EXIT_REFUSED

ROOT = Path(__file__).resolve().parent.parent
STATION = str(Path(sys.executable).parent / "station")


def test_workers_default_is_cores_plus_one_everywhere() -> None:
    assert default_workers() == (os.cpu_count() or 1) + 1
    help_text = " ".join(
        subprocess.run([STATION, "serve", "--help"], capture_output=True, text=True).stdout.split()
    )
    assert "[default: cores + 1]" in help_text
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`--workers` defaults to one more than the machine has cores" in readme


def test_healthcheck_follows_the_port_serve_listens_on() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :].split("\n\n")[0]
    assert "8000" not in healthcheck and "STATION_PORT" in healthcheck
    assert re.search(r"^CMD \[\"serve\"\]$", dockerfile, re.M)  # no port that could disagree
    assert "STATION_PORT=8000" in dockerfile
    help_text = subprocess.run([STATION, "serve", "--help"], capture_output=True, text=True).stdout
    assert "STATION_PORT" in help_text and "STATION_HOST" in help_text
    lint = subprocess.run([str(Path(sys.executable).parent / "hadolint"), str(ROOT / "Dockerfile")],
                          capture_output=True, text=True)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_readme_documents_every_exit_code() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| exit | kinds | meaning |") :].split("\n\n")[0]
    for code in {EXIT_REFUSED, 2, *EXIT_OF_KIND.values(), 130}:
        assert f"\n| {code} |" in table, code
