"""Certificates over HTTP: rate and p50/p99 latency with 1, 8 and 32 concurrent clients.

In one run, on one fresh data directory with its own SoftHSM token and SQLite ledger:
  * in-process: ``Ledger.issue`` called directly (policy, ledger, HSM), one thread;
  * HTTP: ``station serve`` in a subprocess on 127.0.0.1 (``--workers 2`` by default),
    driven by a load generator in its own process (threads, one httpx.Client each),
    POST /v1/certificates with JSON, a fresh device key per request.

The HTTP rate is reported next to the in-process rate as a ratio. Every level runs
for ``--duration`` seconds at most; traffic goes only to 127.0.0.1.

    python bench/http_issuance.py [--duration 5] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
LEVELS = (1, 8, 32)

# `station serve` as the lead's register.py mounts it, or the same command
# mounted here when register.py does not list it yet.
_LAUNCH = (
    "import typer\n"
    "from station.cli.serve_cmds import register\n"
    "app = typer.Typer()\n"
    "register(app)\n"
    "app()\n"
)


def csr_pem(device_id: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "company"),
            x509.NameAttribute(x509.NameOID.ORGANIZATIONAL_UNIT_NAME, "team"),
            x509.NameAttribute(x509.NameOID.COMMON_NAME, device_id),
            x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "US"),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


# ---------------------------------------------------------------- load generator


def _load(
    url: str, token: str, batch: str, clients: int, duration: float, budget: int, out: Any
) -> None:
    """Runs in its own process: `clients` threads posting CSRs for `duration` seconds."""
    import httpx

    csrs = [(f"c{clients}-{i:06d}", csr_pem(f"c{clients}-{i:06d}")) for i in range(budget)]
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_index = [0]
    start = time.perf_counter()
    stop_at = start + duration

    def worker() -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
            while time.perf_counter() < stop_at:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= len(csrs):
                    return
                device_id, pem = csrs[i]
                t0 = time.perf_counter()
                try:
                    r = client.post(
                        "/v1/certificates",
                        json={"batch": batch, "device_id": device_id, "csr": pem},
                    )
                    ok = r.status_code == 201
                    code = "" if ok else str(r.json().get("code", r.status_code))
                except httpx.HTTPError as exc:
                    ok, code = False, type(exc).__name__
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                    else:
                        errors[code] = errors.get(code, 0) + 1

    start = time.perf_counter()
    stop_at = start + duration
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    out.put(
        {
            "clients": clients,
            "certificates": len(latencies),
            "seconds": round(elapsed, 3),
            "per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
            "errors": errors,
        }
    )


def run_level(url: str, token: str, batch: str, clients: int, duration: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    budget = max(200, int(duration * 1500))
    proc = ctx.Process(
        target=_load, args=(url, token, batch, clients, duration, budget, queue), daemon=True
    )
    proc.start()
    result: dict[str, Any] = queue.get(timeout=duration + 120)
    proc.join(10)
    return result


# ---------------------------------------------------------------- the station


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(port: int, workers: int) -> list[str]:
    from station.cli.register import MODULES

    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    station_bin = Path(sys.executable).with_name("station")
    if "station.cli.serve_cmds" in MODULES and station_bin.exists():
        return [str(station_bin), *args]
    return [sys.executable, "-c", _LAUNCH, *args]


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"station serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("station serve did not become healthy")


def in_process_rate(settings: Any, duration: float) -> dict[str, Any]:
    from station.ca import open_ca
    from station.ledger import Ledger

    ca = open_ca(settings)
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "inproc", product="bench", planned_count=10**7, key_mode="board-ecc",
            subject_template=TEMPLATE,
        )  # fmt: skip
        csrs = [(f"in-{i:06d}", csr_pem(f"in-{i:06d}").encode()) for i in range(4000)]
        latencies = []
        t0 = time.perf_counter()
        for device_id, pem in csrs:
            s = time.perf_counter()
            ledger.issue("inproc", device_id, pem, ca)
            latencies.append(time.perf_counter() - s)
            if s - t0 > duration:
                break
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "certificates": len(latencies),
        "per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level (max 60)")
    parser.add_argument("--workers", type=int, default=2, help="station serve --workers")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    duration = min(max(args.duration, 0.5), 60.0)

    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    from hsm.softhsm import use_config, write_config

    conf = write_config(work / "softhsm")
    use_config(conf)
    from station.ca import init_ca
    from station.ledger import Ledger
    from station.settings import Settings

    settings = Settings(data_dir=work / "data", station_id="bench")
    init_ca(settings)
    inproc = in_process_rate(settings, duration)

    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "http", product="bench", planned_count=10**7, key_mode="board-ecc",
            subject_template=TEMPLATE,
        )  # fmt: skip
        token = ledger.create_token("bench", "board")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(conf),
        "STATION_DATA_DIR": str(settings.data_dir),
        "STATION_STATION_ID": "bench",
        "PYTHONPATH": str(ROOT),
    }
    server = subprocess.Popen(
        serve_command(port, args.workers),
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(url, server)
        levels = [run_level(url, token, "http", n, duration) for n in LEVELS]
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    for level in levels:
        level["ratio_to_in_process"] = round(level["per_second"] / inproc["per_second"], 3)
    report = {
        "workers": args.workers,
        "duration_s": duration,
        "in_process": inproc,
        "http": levels,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"in-process Ledger.issue: {inproc['per_second']} certs/s "
          f"(p50 {inproc['p50_ms']} ms, p99 {inproc['p99_ms']} ms)")  # fmt: skip
    print(f"HTTP, station serve --workers {args.workers}:")
    print(f"{'clients':>8} {'certs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>7}  errors")
    for lv in levels:
        print(
            f"{lv['clients']:>8} {lv['per_second']:>9} {lv['p50_ms']:>8} {lv['p99_ms']:>8} "
            f"{lv['ratio_to_in_process']:>7}  {lv['errors'] or ''}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
