"""The app factory: ``create_app(settings)``; ``app_from_env`` for uvicorn's factory mode.

``station serve --workers N`` runs ``uvicorn api.app:app_from_env --factory``:
every worker process builds its own app, ledger engine and PKCS#11 session.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from api import problems
from api.context import AppContext
from api.middleware import (
    BodyLimitMiddleware,
    PlainTextParamsMiddleware,
    SecurityHeadersMiddleware,
)
from api.openapi_ids import operation_id
from api.routers import (
    batches,
    ca,
    certificates,
    cmp,
    dashboard,
    devices,
    est,
    health,
    line,
    publish,
    reports,
    tokens,
)
from api.routers import whitelist as whitelist_router
from api.routers.dashboard import STATIC
from api.sync import ServerSync
from station.settings import Settings

log = logging.getLogger("api")

API_VERSION = "1"


def _warm(station: AppContext) -> None:
    """Open the ledger and the CA in this (worker) process, then recover this
    station's orphaned intents; failures show in /healthz."""
    try:
        station.ledger  # noqa: B018
    except Exception as exc:
        log.warning("ledger not available at start-up: %s", exc)
    try:
        station.ca  # noqa: B018
    except Exception as exc:
        log.warning("CA not available at start-up: %s", exc)
        return
    try:
        # Intents a killed worker left would refuse their boards (issuance-in-progress).
        report = station.recover()
    except Exception as exc:
        log.warning("start-up recovery failed: %s", exc)
    else:
        if report.resigned or report.failed:
            log.info("recovered %d intent(s), %d failed", len(report.resigned), len(report.failed))


def _freeze_heap() -> None:
    """Leave what start-up made out of every later garbage collection.

    A worker holds a large heap of long-lived objects (FastAPI, pydantic, SQLAlchemy,
    cryptography); a full collection walked all of it, pausing the worker a few
    times a second under load, the bulk of the p99 of certificate requests
    (docs/benchmarks.md). Frozen objects are never collected, so only for a server process:
    tests build many apps in one process."""
    gc.collect()
    gc.freeze()


def create_app(settings: Settings | None = None, *, freeze_heap: bool = False) -> FastAPI:
    station = AppContext(settings or Settings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_warm, station)
        sync: ServerSync | None = None
        if station.settings.aws_sync_interval is not None:
            sync = ServerSync(station.settings, station.ledger)
            sync.start()
        if freeze_heap:
            _freeze_heap()
        yield
        if sync is not None:
            await run_in_threadpool(sync.stop)
        station.close()

    app = FastAPI(
        title="Provisioning station",
        version=API_VERSION,
        description="Certificates for factory-line IoT boards, signed by an HSM-backed CA.",
        lifespan=lifespan,
        # FastAPI's /docs and /redoc load their scripts from a public CDN onto the
        # station's origin (and a factory network is often offline): off. The
        # schema stays at /openapi.json for any viewer run elsewhere.
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=operation_id,
    )
    app.state.station = station
    problems.install(app)
    app.add_middleware(PlainTextParamsMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=station.settings.max_body_bytes)
    app.add_middleware(SecurityHeadersMiddleware)
    for module in (
        batches,
        reports,
        certificates,
        devices,
        est,
        cmp,
        whitelist_router,
        ca,
        line,
        tokens,
        health,
        dashboard,
        publish,
    ):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory``: settings from STATION_* variables, built in the worker."""
    return create_app(Settings(), freeze_heap=True)
