"""`station demo`: the station's main job on embedded defaults, checked by real peers.

In a data directory: a CA (made if missing), two batches (board-ecc and
see-rsa), simulated boards provisioned through the line driver, then every
issued chain checked with ``openssl verify -x509_strict`` and, for board-ecc
boards, an mTLS publish to a local mosquitto that requires client certificates.
see-rsa keys live in the (stand-in) Secure Element, which only the board's
``artiksee`` engine can use: those boards are checked by openssl and by their
proof of possession on the line.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from firmware_hooks.simboard import simulate_boards
from station.ca import CertificateAuthority, init_ca, open_ca
from station.ledger import Ledger
from station.line.broker import MosquittoBroker
from station.line.driver import LineDriver, open_port_client
from station.line.provision import ProvisionContext
from station.line.status import STATUS_FILE, LineStatus
from station.line.view import run_with_view
from station.settings import Settings

DEMO_TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
CHAIN_FILE = "deviceCertAndCACert.crt"  # where the agent stores the chain
BOARD_KEY = "deviceCert.key"  # the agent's board-ecc key file


@dataclass
class BatchReport:
    name: str
    key_mode: str
    boards: int
    verified: int = 0
    failed: int = 0
    openssl_ok: int = 0
    mtls_ok: int = 0
    mtls_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and self.verified == self.boards
            and self.openssl_ok == self.verified
            and self.mtls_ok == self.mtls_checked
        )


def _openssl_verify(ca_path: Path, cert_pem: str, work: Path) -> str | None:
    cert_path = work / "cert.pem"
    cert_path.write_text(cert_pem)
    done = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", str(ca_path),
         str(cert_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        return (done.stdout + done.stderr).strip()
    return None


def _provision_batch(
    ctx: ProvisionContext,
    n: int,
    prefix: str,
    home: Path,
    baud: int | None,
    status_path: Path,
    console: Console,
    broker: MosquittoBroker,
    ca_path: Path,
) -> BatchReport:
    report = BatchReport(ctx.batch.name, ctx.batch.key_mode, n)
    ledger = ctx.ledger
    with simulate_boards(n, base_dir=home, id_prefix=prefix, baudrate=baud) as boards:
        ports = [b.port for b in boards]
        driver = LineDriver(
            ctx,
            lambda: ports,
            status=LineStatus(ctx.batch.name, status_path),
            client_factory=lambda path: open_port_client(path, baudrate=baud or 115200),
        )
        run_with_view(
            driver,
            console,
            live=console.is_terminal,
            until=lambda d: len(d.finished_devices()) >= n,
            timeout=300,
        )
    outcomes = driver.finished_devices()
    for board in boards:
        outcome = outcomes.get(board.hardware_id)
        if outcome is None or outcome.result != "verified":
            report.failed += 1
            why = f"{outcome.code}: {outcome.message}" if outcome else "never answered"
            report.problems.append(f"{board.hardware_id}: {why}")
            continue
        report.verified += 1
        device = ledger.get_device(board.hardware_id)
        record = ledger.certificate(device.serial or "")
        chain_path = board.key_dir / CHAIN_FILE
        if hashlib.sha256(chain_path.read_bytes()).hexdigest() != device.chain_sha256:
            report.problems.append(f"{board.hardware_id}: stored chain differs from the ledger")
        error = _openssl_verify(ca_path, record.pem or "", home)
        if error is None:
            report.openssl_ok += 1
        else:
            report.problems.append(f"{board.hardware_id}: openssl verify: {error}")
        if ctx.batch.key_mode == "board-ecc":
            report.mtls_checked += 1
            done = broker.publish(
                chain_path, board.key_dir / BOARD_KEY, client_id=board.hardware_id
            )
            if done.returncode == 0:
                report.mtls_ok += 1
            else:
                report.problems.append(
                    f"{board.hardware_id}: mTLS publish failed: {done.stderr.strip()}"
                )
    return report


def run_demo(
    data_dir: Path, *, boards: int = 4, baud: int | None = 115200, console: Console
) -> int:
    """Run the demo; returns the exit code (0 only if every board passed every check)."""
    settings = Settings(data_dir=data_dir, ca_key_uri=None, database_url=None)
    outcome = init_ca(settings)
    console.print(f"CA: {outcome.status} ({settings.data_dir / 'ca.pem'})")
    ca: CertificateAuthority = outcome.ca or open_ca(settings)
    stamp = datetime.now().strftime("%m%d%H%M%S")
    reports: list[BatchReport] = []
    with (
        Ledger.from_settings(settings) as ledger,
        MosquittoBroker(ca.chain_pem) as broker,
        tempfile.TemporaryDirectory(prefix="station-demo-") as tmp,
    ):
        console.print(f"mosquitto requiring client certificates on 127.0.0.1:{broker.port}")
        for mode, tag in (("board-ecc", "ECC"), ("see-rsa", "RSA")):
            batch = ledger.create_batch(
                f"demo-{mode}-{stamp}",
                product="demo-board",
                planned_count=boards,
                key_mode=mode,
                subject_template=DEMO_TEMPLATE,
                operator="demo",
            )
            console.print(f"batch {batch.name}: {boards} simulated {mode} boards")
            home = Path(tmp) / mode
            home.mkdir()
            reports.append(
                _provision_batch(
                    ProvisionContext(ledger, ca, batch),
                    boards,
                    f"{tag}-{stamp}",
                    home,
                    baud,
                    settings.data_dir / STATUS_FILE,
                    console,
                    broker,
                    settings.ca_cert_path,
                )
            )
    console.print(_summary(reports))
    console.print(
        "mTLS: board-ecc chains and keys published to mosquitto with mosquitto_pub. "
        "see-rsa keys live in the Secure Element stand-in (a real board uses the artiksee "
        "engine): those boards are checked with openssl verify and their proof of possession."
    )
    for report in reports:
        for problem in report.problems:
            console.print(f"[red]problem[/] {problem}")
    ok = all(r.ok for r in reports)
    console.print("[bold green]demo passed[/]" if ok else "[bold red]demo FAILED[/]")
    return 0 if ok else 1


def _summary(reports: list[BatchReport]) -> Table:
    table = Table(title="Batch summary")
    for column in ("batch", "key mode", "boards", "verified", "failed", "openssl verify", "mTLS"):
        table.add_column(column)
    for r in reports:
        mtls = f"{r.mtls_ok}/{r.mtls_checked}" if r.mtls_checked else "n/a (SE key: proof only)"
        table.add_row(
            r.name,
            r.key_mode,
            str(r.boards),
            str(r.verified),
            str(r.failed),
            f"{r.openssl_ok}/{r.verified}",
            mtls,
        )
    return table
