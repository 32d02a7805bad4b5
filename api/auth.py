"""Bearer-token auth with four roles.

Tokens are made with ``station token create --role R --name N`` (or
``POST /v1/tokens`` by an admin); the ledger stores only their SHA-256 and
:meth:`Ledger.lookup_token` compares hashes. A token the ledger accepted is
remembered by each worker process for ``CACHE_TTL_S`` (5) seconds from that
lookup, so certificate requests do not read the database for their token; a
token revoked in the ledger therefore stops working in every worker within 5
seconds (a hit never extends the entry). Refused tokens are not remembered, so a
newly created token works at once.

Failed authentications (no token, or one the ledger does not accept) are counted
per client address: past ``STATION_AUTH_FAILURES_PER_MINUTE`` in a minute the
address gets 429 ``too-many-auth-failures`` (with ``Retry-After``) for every
request needing a token until its failures age out, so tokens cannot be guessed at
line speed. Per worker process; ``/metrics`` counts both
(``station_auth_failures_total``, ``station_auth_rate_limited_total``).

The dependencies are ``async``: a cached token is checked on the event loop
without a hop to the threadpool; only a lookup in the ledger runs in a thread.

Roles: ``board`` < ``operator`` < ``admin`` form a chain (each may do what the
previous may); ``qa`` is read-only and outside the chain.

| route                                   | board | operator | qa  | admin |
|-----------------------------------------|:-----:|:--------:|:---:|:-----:|
| GET /, /static/*, /healthz, /metrics, /openapi.json | public | public | public | public |
| GET /crl, POST /ocsp, GET /ocsp/{req}   | public | public  | public | public |
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
| POST /v1/tokens, GET /v1/tokens         |   -   |    -     |  -  |  yes  |
| DELETE /v1/tokens/{name}                |   -   |    -     |  -  |  yes  |

``reprovision: true`` on POST /v1/certificates (revoke a board's live
certificate for another key) needs operator or admin. No token: 401 with
``WWW-Authenticate: Bearer``; a token whose role may not call the route: 403.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.concurrency import run_in_threadpool

from api.auth_limit import AuthFailureLimiter, TooManyAuthFailures
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


def _lookup(station: AppContext, token: str) -> tuple[Principal, datetime | None] | None:
    found = station.ledger.lookup_token_record(token)
    role = role_from_ledger(found.role) if found is not None else None
    if found is None or role is None:
        return None
    return Principal(found.name, role), found.expires_at


async def authenticate(station: AppContext, token: str | None, address: str = "") -> Principal:
    """The holder of a bearer token: from the cache, else from the ledger (in a thread).

    ``address`` is the client's: its failures are counted, and past the limit it is
    refused (too-many-auth-failures) before its token is looked at.
    """
    limiter: AuthFailureLimiter = station.auth_limiter
    wait = limiter.retry_after(address)
    if wait is not None:
        station.metrics.auth_rate_limited.inc()
        raise TooManyAuthFailures(wait)
    if not token:
        _failed(station, address)
        raise AuthError("a bearer token is required")
    key = hashlib.sha256(token.encode()).hexdigest()
    cache: TokenCache = station.token_cache
    principal = cache.get(key)
    if principal is None:
        found = await run_in_threadpool(_lookup, station, token)
        if found is None:
            _failed(station, address)
            raise AuthError("the bearer token is not valid")
        principal, expires_at = found
        cache.put(key, principal, expires_at)
    return principal


def _failed(station: AppContext, address: str) -> None:
    station.auth_limiter.failed(address)
    station.metrics.auth_failures.inc()


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else ""


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
    request: Request,
    station: ContextDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    token = creds.credentials if creds is not None else None
    return await authenticate(station, token, client_address(request))


async def optional_principal(
    request: Request,
    station: ContextDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal | None:
    """The holder of the request's token for a public route that says more to some
    roles: None without a token, or with one that is refused (counted as a failure)."""
    if creds is None:
        return None
    try:
        return await authenticate(station, creds.credentials, client_address(request))
    except (AuthError, TooManyAuthFailures):
        return None


MaybePrincipal = Annotated[Principal | None, Depends(optional_principal)]


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
