"""Running the app under uvicorn (``station serve``), one or several worker processes."""

from __future__ import annotations

import socket

import uvicorn
from uvicorn.supervisors import Multiprocess

APP = "api.app:app_from_env"


def tcp_listener(sock: socket.socket) -> socket.socket:
    """The pre-bound listener of ``--workers N``, marked IPPROTO_TCP.

    uvicorn binds it with proto 0; accepted sockets inherit that and asyncio then
    skips TCP_NODELAY, so every keep-alive response waits ~40 ms for the client's
    delayed ACK (Kludex/uvicorn#3149).
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.proto != 0:
        return sock
    fixed = socket.socket(sock.family, socket.SOCK_STREAM, socket.IPPROTO_TCP, sock.detach())
    fixed.set_inheritable(True)
    return fixed


class TcpConfig(uvicorn.Config):
    """uvicorn's Config with the TCP_NODELAY fix (module level: workers unpickle it)."""

    def bind_socket(self) -> socket.socket:
        return tcp_listener(super().bind_socket())


def serve(host: str, port: int, workers: int, *, access_log: bool = False) -> None:
    """Factory mode: each worker builds its app and opens its own PKCS#11 session.

    The access log is off unless asked for: one line per certificate costs CPU on
    the worker (about 4% of a loaded worker) and the ledger already records
    every request that changed something.
    """
    config = TcpConfig(
        APP,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=False,
        log_level="info",
        access_log=access_log,
    )
    try:
        if workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
