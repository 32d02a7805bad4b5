"""Liveness for orchestrators and Prometheus: no auth needed.

A public answer says a status and a reason code, no more: a failing part's detail
(a PIN file's path, the module path, the token label, a database URL) goes to the
log and to a request with an operator or admin token. Batch names and board counts
in /metrics are for reader roles (as /v1/batches is). The whitelist sync's state
(lag, last error) is in the details too, but never makes /healthz fail: AWS being
down is no reason to restart the station.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.auth import OPERATOR_UP, READERS, MaybePrincipal
from api.context import AppContext, ContextDep
from api.problems import problem

log = logging.getLogger("api")

router = APIRouter(tags=["health"])

_DETAILS_FOR = frozenset(OPERATOR_UP)
# The bearer token is optional here: appended to the HTTPBearer requirement FastAPI
# derives, the empty requirement says "or none" (OpenAPI 3.1, 4.8.30).
_OPTIONAL_AUTH: dict[str, Any] = {"security": [{}]}
_PRIVATE_METRICS_FOR = frozenset(READERS)


@router.get(
    "/healthz",
    responses={503: {"description": "a part is failing (problem+json with its reason code)"}},
    openapi_extra=_OPTIONAL_AUTH,
)
def healthz(station: ContextDep, who: MaybePrincipal) -> Any:
    checks = station.health()
    failing = [(part, c) for part, c in checks.items() if c["status"] == "failing"]
    details = who is not None and who.role in _DETAILS_FOR
    extra = {"whitelist_sync": whitelist_sync(station)} if details else {}
    if not failing:
        return {"status": "ok", "checks": checks, **extra}
    part, first = failing[0]
    detail = "; ".join(f"{p}: {c.get('detail', '')}" for p, c in failing)
    log.warning("health check failing: %s", detail)
    if not details:
        public = {
            p: {k: v for k, v in c.items() if k in ("status", "code")} for p, c in checks.items()
        }
        return problem(503, first["code"], f"{part} is failing", part=part, checks=public)
    return problem(503, first["code"], detail, part=part, checks=checks, **extra)


def whitelist_sync(station: AppContext) -> dict[str, Any]:
    """The whitelist sync loop's state for the health details: ``status`` (ok, failing or
    not-running), a reason code and detail when failing, and the loop's figures (lag,
    last error, rounds). Failing when its last round failed or warned, or when no round
    succeeded for three intervals and a minute (the loop stopped, or its process died)."""
    status = station.sync_status()
    if status is None:
        return {"status": "not-running"}
    out: dict[str, Any] = {"status": "ok"}
    if status.last_error_code is not None:
        out = {"status": "failing", "code": status.last_error_code, "detail": status.last_error}
    else:
        lag = status.lag()
        if lag is None or lag > 3 * status.interval + 60:
            since = "ever" if lag is None else f"{lag:.0f} s"
            out = {
                "status": "failing",
                "code": "whitelist-sync-stale",
                "detail": f"no whitelist sync succeeded for {since}",
            }
    return {**out, **status.as_dict()}


@router.get("/metrics", response_class=Response, openapi_extra=_OPTIONAL_AUTH)
def metrics(station: ContextDep, who: MaybePrincipal) -> Response:
    reader = who is not None and who.role in _PRIVATE_METRICS_FOR
    return Response(station.metrics.exposition(reader=reader), media_type=CONTENT_TYPE_LATEST)
