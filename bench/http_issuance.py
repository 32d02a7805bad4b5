"""Certificates over HTTP: rate and p50/p99 latency with 1, 8 and 32 concurrent clients.

In one run, on one fresh data directory with its own SoftHSM token and SQLite ledger:
  * in-process: ``Ledger.issue`` called directly (policy, ledger, HSM), one thread;
  * HTTP: ``station serve`` in a subprocess on 127.0.0.1 (``--workers 3`` by default),
    driven by a load generator in its own process (asyncio, one keep-alive
    connection per client, requests built before timing, one untimed warm-up request
    per connection; uvloop),
    POST /v1/certificates with JSON, a fresh device key per request.

The HTTP rate is reported next to the in-process rate as a ratio. Every level runs
for ``--duration`` seconds at most; traffic goes only to 127.0.0.1.

    python bench/http_issuance.py [--duration 5] [--workers 3] [--json]
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
#
# The generator shares the machine's cores with the server, so it must cost little:
# asyncio over raw streams (one keep-alive HTTP/1.1 connection per client, like wrk),
# every request (headers and JSON body) built before timing starts, responses read
# by Content-Length. httpx in threads cost about a millisecond of CPU per request.


def build_request(host: str, token: str, batch: str, device_id: str, pem: str) -> bytes:
    body = json.dumps({"batch": batch, "device_id": device_id, "csr": pem}).encode()
    head = (
        f"POST /v1/certificates HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class ResponseError(Exception):
    pass


async def read_response(reader: Any) -> tuple[int, bytes, bool]:
    """(status, body, keep_alive) of one HTTP/1.1 response with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise ResponseError("no-content-length")
    length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
    body = await reader.readexactly(length)
    return status, body, b"\r\nconnection: close\r\n" not in lower


def _error_code(status: int, body: bytes) -> str:
    try:
        return str(json.loads(body).get("code", status))
    except (ValueError, AttributeError):
        return str(status)


async def _drive(
    host: str, port: int, requests: list[bytes], clients: int, duration: float
) -> tuple[list[float], dict[str, int], float]:
    import asyncio

    latencies: list[float] = []
    errors: dict[str, int] = {}
    pending = iter(requests)
    stop_at = time.perf_counter() + duration

    async def warm() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect and make one untimed request (the server's token cache and threads)."""
        reader, writer = await asyncio.open_connection(host, port)
        request = next(pending, None)
        if request is not None:
            writer.write(request)
            status, body, _ = await read_response(reader)
            if status != 201:
                raise RuntimeError(f"warm-up request answered {status}: {body[:300]!r}")
        return reader, writer

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while time.perf_counter() < stop_at:
                request = next(pending, None)
                if request is None:
                    return
                t0 = time.perf_counter()
                try:
                    writer.write(request)
                    status, body, keep_alive = await read_response(reader)
                except (OSError, EOFError, asyncio.IncompleteReadError, ResponseError) as exc:
                    code = str(exc) if isinstance(exc, ResponseError) else type(exc).__name__
                    errors[code] = errors.get(code, 0) + 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                if status == 201:
                    latencies.append(time.perf_counter() - t0)
                else:
                    code = _error_code(status, body)
                    errors[code] = errors.get(code, 0) + 1
                if not keep_alive:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    connections = await asyncio.gather(*(warm() for _ in range(clients)))
    start = time.perf_counter()
    stop_at = start + duration
    await asyncio.gather(*(client(r, w) for r, w in connections))
    return latencies, errors, time.perf_counter() - start


def _load(
    url: str, token: str, batch: str, clients: int, duration: float, budget: int, out: Any
) -> None:
    """Runs in its own process: `clients` keep-alive connections posting CSRs."""
    import resource
    from urllib.parse import urlsplit

    import uvloop

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [
        build_request(
            f"{host}:{port}", token, batch, f"c{clients}-{i:06d}", csr_pem(f"c{clients}-{i:06d}")
        )
        for i in range(budget)
    ]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    latencies, errors, elapsed = uvloop.run(_drive(host, port, requests, clients, duration))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    answered = len(latencies) + sum(errors.values())
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
            "budget_exhausted": answered + clients >= budget,
            "warmup_requests": clients,  # one per connection before timing, not counted
            "client_loop": "uvloop",
            # CPU of the load generator over the timed window: share of one core,
            # and per answered request.
            "client_cpu_share": round(cpu / elapsed, 3),
            "client_cpu_us_per_request": round(cpu / answered * 1e6, 1) if answered else None,
        }
    )


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its direct children (the uvicorn workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def one(p: str) -> tuple[int, float]:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / tick

    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid, cpu = one(entry)
        except (OSError, IndexError, ValueError):
            continue
        if int(entry) == pid or ppid == pid:
            total += cpu
    return total


def run_level(
    url: str, token: str, batch: str, clients: int, duration: float, server_pid: int | None = None
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    budget = max(200, int(duration * 1500))
    proc = ctx.Process(
        target=_load, args=(url, token, batch, clients, duration, budget, queue), daemon=True
    )
    # The server's CPU is read around the whole level (CSR making included, but the
    # server is idle then); the generator's own CPU is measured inside it.
    cpu0 = _proc_cpu_seconds(server_pid) if server_pid else 0.0
    proc.start()
    result: dict[str, Any] = queue.get(timeout=duration + 120)
    proc.join(10)
    if server_pid:
        cpu = _proc_cpu_seconds(server_pid) - cpu0
        answered = result["certificates"] + sum(result["errors"].values())
        result["server_cpu_share"] = round(cpu / result["seconds"], 3)
        result["server_cpu_ms_per_request"] = round(cpu / answered * 1e3, 3) if answered else None
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
    parser.add_argument(
        "--workers", type=int, default=3, help="station serve --workers (cores + 1 by advice)"
    )
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
        levels = [run_level(url, token, "http", n, duration, server.pid) for n in LEVELS]
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
    print(
        f"{'clients':>8} {'certs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>7}"
        f" {'client cpu':>10} {'server cpu ms/req':>17}  errors"
    )
    for lv in levels:
        print(
            f"{lv['clients']:>8} {lv['per_second']:>9} {lv['p50_ms']:>8} {lv['p99_ms']:>8} "
            f"{lv['ratio_to_in_process']:>7} {lv['client_cpu_share']:>10}"
            f" {lv.get('server_cpu_ms_per_request', ''):>17}  {lv['errors'] or ''}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
