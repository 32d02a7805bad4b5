"""EST simpleenroll over TLS against the JSON API over TLS, 32 keep-alive clients, one run.

One fresh data directory (SoftHSM token, SQLite ledger), one ``station serve
--workers 3`` with a development TLS pair (``station tls init``). A load generator
in its own process (asyncio + uvloop, one keep-alive TLS connection per client,
every request built before timing, one untimed warm-up request per connection)
drives, one after the other for ``--duration`` seconds each:

  * JSON API: POST /v1/certificates, JSON with a PEM CSR, Bearer token;
  * EST: POST /.well-known/est/B/simpleenroll, base64 DER CSR, the token as the
    HTTP Basic password, PKCS#7 certs-only back.

Both end in the same issuance path; the ratio EST / JSON is printed (the issue
expects at least 0.8). Traffic only to 127.0.0.1.

    python bench/est.py [--duration 5] [--clients 32] [--workers 3] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from http_issuance import (  # noqa: E402
    TEMPLATE,
    ResponseError,
    csr_pem,
    free_port,
    percentile,
    read_response,
)


def _request(kind: str, host: str, token: str, batch: str, device_id: str) -> bytes:
    pem = csr_pem(device_id)
    if kind == "json":
        body = json.dumps({"batch": batch, "device_id": device_id, "csr": pem}).encode()
        head = (
            f"POST /v1/certificates HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
    else:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        der = x509.load_pem_x509_csr(pem.encode()).public_bytes(Encoding.DER)
        body = base64.b64encode(der)
        basic = base64.b64encode(f"board:{token}".encode()).decode()
        head = (
            f"POST /.well-known/est/{batch}/simpleenroll HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Basic {basic}\r\nContent-Type: application/pkcs10\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
    return head.encode() + body


async def _drive(
    port: int, cafile: str, requests: list[bytes], clients: int, duration: float, ok: int
) -> tuple[list[float], dict[str, int], float]:
    import asyncio

    ctx = ssl.create_default_context(cafile=cafile)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    pending = iter(requests)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )

    async def warm() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await connect()
        request = next(pending, None)
        if request is not None:
            writer.write(request)
            status, body, _ = await read_response(reader)
            if status != ok:
                raise RuntimeError(f"warm-up request answered {status}: {body[:300]!r}")
        return reader, writer

    stop_at = 0.0

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while time.perf_counter() < stop_at:
                request = next(pending, None)
                if request is None:
                    return
                t0 = time.perf_counter()
                try:
                    writer.write(request)
                    status, _body, keep_alive = await read_response(reader)
                except (OSError, EOFError, asyncio.IncompleteReadError, ResponseError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    writer.close()
                    reader, writer = await connect()
                    continue
                if status == ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                if not keep_alive:
                    writer.close()
                    reader, writer = await connect()
        finally:
            writer.close()

    connections = await asyncio.gather(*(warm() for _ in range(clients)))
    start = time.perf_counter()
    stop_at = start + duration
    await asyncio.gather(*(client(r, w) for r, w in connections))
    return latencies, errors, time.perf_counter() - start


def _load(
    kind: str, port: int, cafile: str, token: str, batch: str, clients: int, duration: float,
    budget: int, out: Any,
) -> None:  # fmt: skip
    import uvloop

    host = f"localhost:{port}"
    requests = [_request(kind, host, token, batch, f"{kind}-{i:06d}") for i in range(budget)]
    ok = 201 if kind == "json" else 200
    latencies, errors, elapsed = uvloop.run(_drive(port, cafile, requests, clients, duration, ok))
    latencies.sort()
    out.put(
        {
            "channel": kind,
            "clients": clients,
            "certificates": len(latencies),
            "seconds": round(elapsed, 3),
            "per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
            "errors": errors,
            "budget_exhausted": len(latencies) + sum(errors.values()) + clients >= budget,
        }
    )


def run(kind: str, port: int, cafile: str, token: str, batch: str, clients: int,
        duration: float) -> dict[str, Any]:  # fmt: skip
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    budget = max(300, int(duration * 1200))
    proc = ctx.Process(
        target=_load,
        args=(kind, port, cafile, token, batch, clients, duration, budget, queue),
        daemon=True,
    )
    proc.start()
    result: dict[str, Any] = queue.get(timeout=duration + 300)
    proc.join(10)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per channel")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    duration = min(max(args.duration, 0.5), 60.0)

    work = Path(tempfile.mkdtemp(prefix="bench-est-"))
    from hsm.softhsm import use_config, write_config

    conf = write_config(work / "softhsm")
    use_config(conf)
    from station.ca import init_ca
    from station.ledger import Ledger
    from station.settings import Settings
    from station.tls import init_dev_tls

    settings = Settings(data_dir=work / "data", station_id="bench")
    init_ca(settings)
    tls = init_dev_tls(settings, ["localhost"])
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "B", product="bench", planned_count=10**7, key_mode="board-ecc",
            subject_template=TEMPLATE,
        )  # fmt: skip
        token = ledger.create_token("bench", "board")

    port = free_port()
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(conf),
        "STATION_DATA_DIR": str(settings.data_dir),
        "STATION_STATION_ID": "bench",
        "STATION_TLS_CERT": str(tls.cert),
        "STATION_TLS_KEY": str(tls.key),
        "PYTHONPATH": str(ROOT),
    }
    server = subprocess.Popen(
        [sys.executable, "-c", "from station.cli import main\nmain()\n", "serve",
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import httpx

        verify = ssl.create_default_context(cafile=str(tls.ca))
        deadline = time.monotonic() + 60
        while True:
            try:
                url = f"https://localhost:{port}/healthz"
                if httpx.get(url, verify=verify, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("station serve did not come up")
            time.sleep(0.2)
        results = [
            run(kind, port, str(tls.ca), token, "B", args.clients, duration)
            for kind in ("json", "est")
        ]
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    ratio = round(results[1]["per_second"] / results[0]["per_second"], 3)
    report = {"workers": args.workers, "duration_s": duration, "results": results,
              "est_to_json": ratio}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"station serve --workers {args.workers}, TLS, {args.clients} keep-alive clients")
    print(f"{'channel':>8} {'certs/s':>9} {'p50 ms':>8} {'p99 ms':>8}  errors")
    for r in results:
        print(f"{r['channel']:>8} {r['per_second']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8}  "
              f"{r['errors'] or ''}")  # fmt: skip
    print(f"EST / JSON API: {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
