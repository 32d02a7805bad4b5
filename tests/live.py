"""The API served by real uvicorn on 127.0.0.1 (a port the kernel picks), for tests
that must see what a client on the network sees: headers, client addresses, the
real HTTP stack. Same `Api` helper as the in-process tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from api.app import create_app
from station.settings import Settings
from tests.test_api_helpers import ROLES, Api


def serve(settings: Settings) -> Iterator[tuple[str, Any]]:
    """Yield (base URL, app) of a uvicorn server running the station's app in a thread."""
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def live_api_for(settings: Settings) -> Iterator[Api]:
    for url, app in serve(settings):
        ledger = app.state.station.ledger
        tokens = {r: ledger.create_token(f"test-{r}", r) for r in ROLES}
        with httpx.Client(base_url=url, timeout=30) as client:
            yield Api(client, tokens, settings)  # type: ignore[arg-type]


@pytest.fixture
def live_api(station_settings: Settings) -> Iterator[Api]:
    yield from live_api_for(station_settings)
