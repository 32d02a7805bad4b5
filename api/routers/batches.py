"""Production batches: open, list, read, close."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, status

from api.auth import OperatorUp, Reader
from api.context import ContextDep
from api.schemas import BatchIn, BatchOut, BatchPage
from station.errors import PolicyError
from station.ledger import BatchState

router = APIRouter(prefix="/v1/batches", tags=["batches"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=BatchOut)
def create_batch(body: BatchIn, station: ContextDep, who: OperatorUp) -> BatchOut:
    batch = station.ledger.create_batch(
        body.name,
        product=body.product,
        planned_count=body.planned_count,
        key_mode=body.key_mode,
        subject_template=body.subject_template,
        days=body.days,
        operator=who.name,
        crl_url=body.crl_url,
        ocsp_url=body.ocsp_url,
    )
    return BatchOut(**asdict(batch))


@router.get("", response_model=BatchPage)
def list_batches(
    station: ContextDep,
    _: Reader,
    state: Annotated[str | None, Query(json_schema_extra={"enum": list(BatchState)})] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> BatchPage:
    if state is not None and state not in set(BatchState):
        # The ledger filters by any string: an unknown state would list nothing, silently.
        states = ", ".join(BatchState)
        raise PolicyError(f"state {state!r} is not one of {states}", code="bad-state")
    every = station.ledger.list_batches(state=state)
    return BatchPage(
        items=[BatchOut(**asdict(b)) for b in every[offset : offset + limit]],
        total=len(every),
        limit=limit,
        offset=offset,
    )


@router.get("/{name}", response_model=BatchOut)
def get_batch(name: str, station: ContextDep, _: Reader) -> BatchOut:
    return BatchOut(**asdict(station.ledger.get_batch(name)))


@router.post("/{name}/close", response_model=BatchOut)
def close_batch(name: str, station: ContextDep, who: OperatorUp) -> BatchOut:
    return BatchOut(**asdict(station.ledger.close_batch(name, operator=who.name)))
