"""The certificate route's hot path: the token cache, the issue executor, TCP_NODELAY.

The token cache runs on a fake clock (no sleeping); everything else is real: the
ledger, the SoftHSM token, uvicorn's sockets.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop

from api.app import create_app
from api.server import TcpConfig
from api.token_cache import CACHE_TTL_S, Principal, TokenCache
from station.errors import StationError
from station.ledger.tokens import Role
from station.policy import CONTROL_CHARACTERS_PATTERN
from station.settings import Settings
from tests.test_api_helpers import TEMPLATE, Api, api, new_csr

__all__ = ["api"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(api: Api) -> FakeClock:
    """The app's token cache on a clock the test moves."""
    fake = FakeClock()
    station = api.client.app.state.station  # type: ignore[attr-defined]
    station.token_cache = TokenCache(CACHE_TTL_S, clock=fake)
    return fake


@pytest.fixture
def lookups(api: Api) -> Iterator[list[str]]:
    """Names the ledger's token lookups returned (a spy around the real ledger)."""
    ledger = api.client.app.state.station.ledger  # type: ignore[attr-defined]
    real: Callable[[str], Any] = ledger.lookup_token_record
    seen: list[str] = []

    def spy(token: str) -> Any:
        found = real(token)
        seen.append(found.name if found else "")
        return found

    ledger.lookup_token_record = spy
    yield seen
    del ledger.lookup_token_record


# ------------------------------------------------------------------ the cache alone


def test_cache_entry_lives_ttl_seconds_from_its_lookup_and_hits_do_not_extend_it() -> None:
    clock = FakeClock()
    cache = TokenCache(5.0, clock=clock)
    who = Principal("line-1", Role.BOARD)
    cache.put("k", who)
    for _ in range(4):
        clock.now += 1.2
        assert cache.get("k") == who
    clock.now += 0.2  # 5.0 s after the lookup
    assert cache.get("k") is None


def test_cache_with_zero_ttl_remembers_nothing() -> None:
    cache = TokenCache(0.0, clock=FakeClock())
    cache.put("k", Principal("x", Role.QA))
    assert cache.get("k") is None


def test_cache_is_bounded() -> None:
    cache = TokenCache(5.0, max_entries=3, clock=FakeClock())
    for i in range(3):
        cache.put(f"k{i}", Principal(f"n{i}", Role.QA))
    cache.put("k3", Principal("n3", Role.QA))
    assert cache.get("k3") is not None
    assert [cache.get(f"k{i}") for i in range(3)] == [None, None, None]


# ------------------------------------------------------------------ through the API


def test_a_cached_token_is_looked_up_once_per_ttl(
    api: Api, clock: FakeClock, lookups: list[str]
) -> None:
    for _ in range(5):
        assert api.get("/v1/ca", "board").status_code == 200
    assert lookups == ["test-board"]
    clock.now += CACHE_TTL_S
    assert api.get("/v1/ca", "board").status_code == 200
    assert lookups == ["test-board", "test-board"]


def test_a_revoked_token_stops_working_within_the_ttl(
    api: Api, clock: FakeClock, lookups: list[str]
) -> None:
    assert api.get("/v1/ca", "board").status_code == 200
    api.client.app.state.station.ledger.revoke_token("test-board")  # type: ignore[attr-defined]
    clock.now += CACHE_TTL_S - 0.01
    assert api.get("/v1/ca", "board").status_code == 200  # the documented grace
    clock.now += 0.01
    r = api.get("/v1/ca", "board")
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert api.get("/v1/ca", "board").status_code == 401
    assert lookups == ["test-board", "", ""]


def test_a_refused_token_is_asked_again_so_a_new_token_works_at_once(
    api: Api, clock: FakeClock, lookups: list[str]
) -> None:
    bad = {"Authorization": "Bearer not-a-token"}
    for _ in range(2):
        assert api.client.get("/v1/ca", headers=bad).status_code == 401
    assert lookups == ["", ""]


# ------------------------------------------------------------------ the issue executor


def test_concurrent_certificate_requests_all_get_their_own_certificate(
    station_settings: Settings,
) -> None:
    """32 requests at once on one event loop: the route awaits the issue executor."""
    app = create_app(station_settings)
    station = app.state.station
    ledger = station.ledger
    ledger.create_batch(
        "C", product="p", planned_count=100, key_mode="board-ecc", subject_template=TEMPLATE
    )
    token = ledger.create_token("c", "board")
    csrs = [new_csr(f"c-{i}")[0] for i in range(32)]

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=headers
        ) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/certificates", json={"batch": "C", "device_id": f"c-{i}", "csr": pem}
                    )
                    for i, pem in enumerate(csrs)
                )
            )

    try:
        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [201] * 32, responses[0].text
        serials = {r.json()["serial"] for r in responses}
        assert len(serials) == 32
        assert {r.headers["content-type"] for r in responses} == {"application/json"}
        assert {d.state for d in ledger.list_devices(batch="C")} == {"issued"}
        assert station.metrics.issued_new._value.get() == 32
    finally:
        station.close()


def test_close_waits_for_issuance_in_flight_then_a_new_executor_is_made(
    station_settings: Settings,
) -> None:
    app = create_app(station_settings)
    station = app.state.station
    first = station.issue_executor
    started = first.submit(lambda: station.ledger.counts())
    station.close()
    assert started.done()
    assert station.issue_executor is not first
    station.close()


# ------------------------------------------------------------------ sockets


def _nodelay_of_accepted(listener: socket.socket, loop: str = "asyncio") -> int:
    seen: list[int] = []

    async def run() -> None:
        accepted = asyncio.Event()

        def on_connect(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            sock = w.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            accepted.set()
            w.close()

        server = await asyncio.start_server(on_connect, sock=listener)
        _r, w = await asyncio.open_connection(*listener.getsockname()[:2])
        await asyncio.wait_for(accepted.wait(), 10)
        w.close()
        server.close()

    if loop == "uvloop":
        uvloop.run(run())
    else:
        asyncio.run(run())
    return seen[0]


def test_accepted_connections_have_tcp_nodelay() -> None:
    """Keep-alive answers must not wait ~40 ms for the client's delayed ACK
    (uvicorn#3149): the listener `station serve --workers N` binds is marked
    IPPROTO_TCP so the event loop sets TCP_NODELAY on every accepted socket."""
    assert _nodelay_of_accepted(TcpConfig("x:y", host="127.0.0.1", port=0).bind_socket()) != 0
    # What the fix is for: uvicorn's own listener gives sockets without it.
    assert _nodelay_of_accepted(uvicorn.Config("x:y", host="127.0.0.1", port=0).bind_socket()) == 0


def test_uvloop_serves_with_tcp_nodelay() -> None:
    """uvicorn's loop="auto" takes uvloop (a dependency); it sets TCP_NODELAY itself."""
    config = uvicorn.Config("x:y", host="127.0.0.1", port=0)
    assert config.loop == "auto" and config.http == "auto"
    assert _nodelay_of_accepted(TcpConfig("x:y", host="127.0.0.1", port=0).bind_socket(), "uvloop")


# ------------------------------------------------------------------ the route without dependencies


def test_the_certificate_route_documents_what_dependencies_would_have(api: Api) -> None:
    """POST /v1/certificates takes the bare Request; its OpenAPI still names the
    bearer scheme, the raw-CSR query parameters and the 422 problem."""
    op = api.client.get("/openapi.json").json()["paths"]["/v1/certificates"]["post"]
    assert op["security"] == [{"HTTPBearer": []}]
    params = {p["name"]: p for p in op["parameters"]}
    assert set(params) == {"batch", "device_id", "reprovision", "reason", "renews"}
    assert all(p["in"] == "query" and not p["required"] for p in params.values())
    no_control = {"pattern": CONTROL_CHARACTERS_PATTERN}  # api.middleware refuses them
    # Optional parameters are documented without `null` (issue 20's OpenAPI clean-up).
    batch = params["batch"]["schema"]
    assert {"maxLength": 128, "type": "string", **no_control}.items() <= batch.items()
    assert params["reprovision"]["schema"]["type"] == "boolean"
    assert "application/problem+json" in op["responses"]["422"]["content"]


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ({"batch": "b" * 129, "device_id": "d"}, ["query", "batch"]),
        ({"batch": "B1", "device_id": "d" * 129}, ["query", "device_id"]),
        ({"batch": "B1", "device_id": "d", "reprovision": "perhaps"}, ["query", "reprovision"]),
    ],
)
def test_a_bad_query_is_a_422_naming_the_parameter(
    api: Api, query: dict[str, str], loc: list[str]
) -> None:
    api.batch()
    pem, _ = new_csr("d")
    r = api.post(
        "/v1/certificates",
        "board",
        params=query,
        content=pem,
        headers={"Content-Type": "application/x-pem-file"},
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid-request", r.text
    assert [e["loc"] for e in r.json()["errors"]] == [loc]


def test_reprovision_in_the_query_reads_as_fastapi_reads_a_bool(api: Api) -> None:
    """'yes', 'on', '1' are true: a board asking for one still gets 403."""
    api.batch()
    pem, _ = new_csr("d")
    for value in ("yes", "on", "1", "True"):
        r = api.post(
            "/v1/certificates",
            "board",
            params={"batch": "B1", "device_id": "d", "reprovision": value},
            content=pem,
            headers={"Content-Type": "application/x-pem-file"},
        )
        assert r.status_code == 403 and r.json()["code"] == "forbidden", (value, r.text)


# ------------------------------------------------------------------ the workers' listener


def test_each_worker_unpickles_its_own_listener_on_the_port() -> None:
    parent = TcpConfig("x:y", host="127.0.0.1", port=0).bind_socket()
    workers = [pickle.loads(pickle.dumps(parent)) for _ in range(2)]  # noqa: S301 (our own)
    try:
        address = parent.getsockname()
        assert [w.getsockname() for w in workers] == [address, address]
        assert len({parent.fileno(), *(w.fileno() for w in workers)}) == 3
        for w in workers:
            assert w.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert w.proto == socket.IPPROTO_TCP
            w.listen(64)
        # The kernel spreads connections over both listening sockets (by address hash).
        clients = [socket.create_connection(address, timeout=5) for _ in range(64)]
        for w in workers:
            w.setblocking(False)
        accepted = [0, 0]
        for i, w in enumerate(workers):
            while True:
                try:
                    conn, _ = w.accept()
                except BlockingIOError:
                    break
                conn.close()
                accepted[i] += 1
        assert sum(accepted) == 64 and min(accepted) > 0, accepted
        for c in clients:
            c.close()
    finally:
        for s in (parent, *workers):
            s.close()


def test_a_second_server_on_the_same_port_refuses_to_start() -> None:
    """SO_REUSEPORT alone would let it start and take half the connections."""
    first = TcpConfig("x:y", host="127.0.0.1", port=0).bind_socket()
    port = first.getsockname()[1]
    try:
        # One line and exit 5 (issue 20), no longer uvicorn's SystemExit.
        with pytest.raises(StationError, match="address-in-use"):  # workers not started yet
            TcpConfig("x:y", host="127.0.0.1", port=port).bind_socket()
        worker = pickle.loads(pickle.dumps(first))  # noqa: S301 (our own socket, in-process)
        worker.listen(8)
        with pytest.raises(StationError, match="address-in-use"):  # and serving
            TcpConfig("x:y", host="127.0.0.1", port=port).bind_socket()
        worker.close()
    finally:
        first.close()


# ------------------------------------------------------------------ the heap


def test_a_server_app_freezes_its_start_up_heap_and_a_test_app_does_not(
    station_settings: Settings,
) -> None:
    import gc

    from fastapi.testclient import TestClient

    gc.unfreeze()
    try:
        with TestClient(create_app(station_settings)):
            assert gc.get_freeze_count() == 0
        with TestClient(create_app(station_settings, freeze_heap=True)):
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
