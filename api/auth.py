"""Bearer-token auth with four roles.

Tokens are made with ``station token create --role R --name N`` (or
``POST /v1/tokens`` by an admin); the ledger stores only their SHA-256 and
:meth:`Ledger.lookup_token` compares hashes. A token the ledger accepted is
remembered by each worker process for ``CACHE_TTL_S`` (5) seconds from that
lookup, so certificate requests do not read the database for their token; a
token revoked in the ledger therefore stops working in every worker within 5
seconds (a hit never extends the entry). Refused tokens are not remembered, so a
newly created token works at once.

The dependencies are ``async``: a cached token is checked on the event loop
without a hop to the threadpool; only a lookup in the ledger runs in a thread.

Roles: ``board`` < ``operator`` < ``admin`` form a chain (each may do what the
previous may); ``qa`` is read-only and outside the chain.

| route                                   | board | operator | qa  | admin |
|-----------------------------------------|:-----:|:--------:|:---:|:-----:|
| GET /, /static/*, /healthz, /metrics, /openapi.json, /docs | public | public | public | public |
| GET /v1/ca                              |  yes  |   yes    | yes |  yes  |
| POST /v1/certificates                   |  yes  |   yes    |  -  |  yes  |
| POST /v1/devices/{id}/challenge         |  yes  |   yes    |  -  |  yes  |
| POST /v1/devices/{id}/proof             |  yes  |   yes    |  -  |  yes  |
| POST /v1/batches                        |   -   |   yes    |  -  |  yes  |
| POST /v1/batches/{name}/close           |   -   |   yes    |  -  |  yes  |
| GET /v1/batches, /v1/batches/{name}     |   -   |   yes    | yes |  yes  |
| GET /v1/devices, /v1/devices/{id}       |   -   |   yes    | yes |  yes  |
| GET /v1/whitelist                       |   -   |   yes    | yes |  yes  |
| GET /v1/line/status                     |   -   |   yes    | yes |  yes  |
| POST /v1/devices/{id}/revoke            |   -   |    -     |  -  |  yes  |
| POST /v1/tokens                         |   -   |    -     |  -  |  yes  |

``reprovision: true`` on POST /v1/certificates (revoke a board's live
certificate for another key) needs operator or admin. No token: 401 with
``WWW-Authenticate: Bearer``; a token whose role may not call the route: 403.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.concurrency import run_in_threadpool

from api.context import AppContext, ContextDep
from api.token_cache import Principal, TokenCache
from station.errors import Kind, StationError
from station.ledger.tokens import Role


def role_from_ledger(name: str) -> Role | None:
    try:
        return Role(name)
    except ValueError:
        return None


class AuthError(StationError):
    code = "unauthorized"
    kind = Kind.UNAUTHENTICATED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(StationError):
    code = "forbidden"
    kind = Kind.FORBIDDEN


_bearer = HTTPBearer(auto_error=False)


def _lookup(station: AppContext, token: str) -> Principal | None:
    found = station.ledger.lookup_token(token)
    role = role_from_ledger(found[1]) if found is not None else None
    if found is None or role is None:
        return None
    return Principal(found[0], role)


async def authenticate(station: AppContext, token: str | None) -> Principal:
    """The holder of a bearer token: from the cache, else from the ledger (in a thread)."""
    if not token:
        raise AuthError("a bearer token is required")
    key = hashlib.sha256(token.encode()).hexdigest()
    cache: TokenCache = station.token_cache
    principal = cache.get(key)
    if principal is None:
        principal = await run_in_threadpool(_lookup, station, token)
        if principal is None:
            raise AuthError("the bearer token is not valid")
        cache.put(key, principal)
    return principal


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, as HTTPBearer reads it."""
    scheme, token = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and token) or scheme.lower() != "bearer":
        return None
    return token


def permit(principal: Principal, allowed: frozenset[Role]) -> Principal:
    if principal.role not in allowed:
        names = ", ".join(sorted(r.value for r in allowed))
        raise Forbidden(f"role {principal.role.value} may not do this (needs {names})")
    return principal


async def current_principal(
    station: ContextDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    return await authenticate(station, creds.credentials if creds is not None else None)


def require(*roles: Role) -> object:
    allowed = frozenset(roles)

    async def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        return permit(principal, allowed)

    return Depends(check)


ANY = (Role.BOARD, Role.OPERATOR, Role.QA, Role.ADMIN)
BOARD_UP = (Role.BOARD, Role.OPERATOR, Role.ADMIN)
OPERATOR_UP = (Role.OPERATOR, Role.ADMIN)
READERS = (Role.OPERATOR, Role.QA, Role.ADMIN)

AnyRole = Annotated[Principal, require(*ANY)]
BoardUp = Annotated[Principal, require(*BOARD_UP)]
OperatorUp = Annotated[Principal, require(*OPERATOR_UP)]
Reader = Annotated[Principal, require(*READERS)]
Admin = Annotated[Principal, require(Role.ADMIN)]
