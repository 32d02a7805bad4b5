"""Running the app under uvicorn (``station serve``), one or several worker processes."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import tempfile
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from station.errors import Kind, StationError
from station.tls import TlsFiles

log = logging.getLogger("uvicorn.error")

APP = "api.app:app_from_env"


class WorkerListener(socket.socket):
    """The listener of ``--workers N``: every worker gets a socket of its own on the port.

    uvicorn hands each worker (spawned, not forked) the parent's socket by pickling
    it; this one unpickles in the worker as a new socket bound to the same address
    with SO_REUSEPORT, so the kernel spreads new connections over the workers by
    their address hash. With one shared socket the worker that woke first took every
    pending connection at once (asyncio accepts up to the backlog per wake-up): a
    burst of 32 keep-alive clients could land 29 on one worker while the other
    idled. The parent's own socket is bound (holding the port) but never listens,
    so it gets no connections.

    Sockets made here are IPPROTO_TCP: asyncio sets TCP_NODELAY only on accepted
    sockets whose listener says so (uvicorn binds with proto 0, and keep-alive
    answers then waited ~40 ms for the client's delayed ACK, Kludex/uvicorn#3149).
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (reuseport_listener, (self.family, self.getsockname()))


def reuseport_listener(
    family: int, address: Any, cls: type[socket.socket] = socket.socket, *, reuse_addr: bool = True
) -> Any:
    sock = cls(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if reuse_addr:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class TcpConfig(uvicorn.Config):
    """uvicorn's Config binding a :class:`WorkerListener` (module level: workers unpickle it)."""

    def bind_socket(self) -> socket.socket:
        if self.uds is not None or self.fd is not None:
            return super().bind_socket()
        family = socket.AF_INET6 if self.host and ":" in self.host else socket.AF_INET
        try:
            # A plain bind first: SO_REUSEPORT alone would let a second `station serve`
            # on the same port start and silently take half the connections. The
            # parent's socket has no SO_REUSEADDR, so such a probe fails against it
            # even before the workers listen.
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((self.host, self.port))
                address = probe.getsockname()
            sock: socket.socket = reuseport_listener(
                family, address, WorkerListener, reuse_addr=False
            )
        except OSError as exc:
            # One line and its own exit code (5) from the CLI, not uvicorn's log and exit 3.
            raise StationError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                code="address-in-use" if exc.errno == errno.EADDRINUSE else "cannot-listen",
                kind=Kind.IN_USE if exc.errno == errno.EADDRINUSE else Kind.NOT_CONFIGURED,
            ) from None
        host, port = sock.getsockname()[:2]
        scheme = "https" if self.is_ssl else "http"
        log.info("Uvicorn running on %s://%s:%d (Press CTRL+C to quit)", scheme, host, port)
        return sock


def default_workers() -> int:
    """One more worker than the machine has cores (see the README for why)."""
    return (os.cpu_count() or 1) + 1


def serve(
    host: str, port: int, workers: int, *, access_log: bool = False, tls: TlsFiles | None = None
) -> None:
    """Factory mode: each worker builds its app and opens its own PKCS#11 session.

    The access log is off unless asked for: one line per certificate costs CPU on
    the worker (about 4% of a loaded worker) and the ledger already records
    every request that changed something.

    With ``tls`` the port speaks HTTPS only; a client certificate from the
    station's CA is asked for (optional by default) and handed to the app through
    the ASGI TLS extension (api/tls.py). (`station serve` warns about plain HTTP
    on an address other than loopback.)
    """
    options: dict[str, Any] = {}
    if tls is not None:
        options = {
            "ssl_certfile": str(tls.cert),
            "ssl_keyfile": str(tls.key),
            "ssl_cert_reqs": tls.cert_reqs,
            "ssl_ca_certs": str(tls.client_ca) if tls.client_ca is not None else None,
            "http": "api.tls:TlsHttpToolsProtocol",
        }
    config = TcpConfig(
        APP,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=False,
        log_level="info",
        access_log=access_log,
        **options,
    )
    # Bound here, before any worker starts: a port in use is a StationError the CLI reports.
    sockets = [config.bind_socket()]
    # Every worker's request metrics in one directory, summed by whichever worker a
    # scrape reaches (api/metrics.py). Set before the workers (spawned) import
    # prometheus_client; a directory of this run's own, removed when it ends.
    own_dir = None
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        own_dir = tempfile.mkdtemp(prefix="station-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    try:
        if workers > 1:
            Multiprocess(config, sockets=sockets).run()
        else:
            uvicorn.Server(config).run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
