"""Liveness for orchestrators and Prometheus: no auth."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.context import ContextDep
from api.problems import problem

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    responses={503: {"description": "a part is failing (problem+json naming it)"}},
)
def healthz(station: ContextDep) -> Any:
    checks = station.health()
    failing = [(part, c) for part, c in checks.items() if c["status"] == "failing"]
    if not failing:
        return {"status": "ok", "checks": checks}
    part, first = failing[0]
    detail = "; ".join(f"{p}: {c.get('detail', '')}" for p, c in failing)
    return problem(503, first["code"], detail, part=part, checks=checks)


@router.get("/metrics", response_class=Response)
def metrics(station: ContextDep) -> Response:
    return Response(generate_latest(station.metrics.registry), media_type=CONTENT_TYPE_LATEST)
