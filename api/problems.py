"""RFC 9457 problem details: one handler for every error the API answers with.

Every error body is ``application/problem+json`` with ``type``, ``title``,
``status``, ``detail`` and ``code``; ``code`` is the station's stable reason
code (the same the CLI and the serial line report).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from hsm.errors import HsmError
from station.errors import Kind, StationError, kind_of
from station.policy import CONTROL_CHARACTERS_PATTERN

log = logging.getLogger("api")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:station:problem:"

# Codes for the HTTP errors FastAPI/Starlette raise themselves.
_HTTP_CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    413: "body-too-large",
    415: "unsupported-media-type",
    422: "invalid-request",
}


# The one place an error kind becomes an HTTP status.
STATUS_OF_KIND: dict[Kind, int] = {
    Kind.BAD_INPUT: 400,
    Kind.INVALID: 422,
    Kind.REFUSED: 422,
    Kind.NOT_FOUND: 404,
    Kind.CONFLICT: 409,
    Kind.UNAUTHENTICATED: 401,
    Kind.FORBIDDEN: 403,
    Kind.UNSUPPORTED_MEDIA: 415,
    Kind.TOO_LARGE: 413,
    Kind.RATE_LIMITED: 429,
    Kind.UNAVAILABLE: 503,
    Kind.UPSTREAM: 502,
    Kind.NOT_CONFIGURED: 503,
    Kind.IN_USE: 409,
}


def http_status(exc: BaseException) -> int:
    """The HTTP status for an error of the station's vocabulary (500 for anything else)."""
    kind = kind_of(exc)
    return 500 if kind is None else STATUS_OF_KIND[kind]


class BodyTooLarge(StarletteHTTPException):
    """Raised from the body-limit middleware's receive(); FastAPI lets HTTPExceptions through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")
        self.limit = limit


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {
        "type": TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    body.update(extra)
    return JSONResponse(
        jsonable_encoder(body), status_code=status, headers=headers, media_type=PROBLEM_JSON
    )


def problem_response(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler: maps every error type to problem+json."""
    if isinstance(exc, StationError):
        headers = getattr(exc, "headers", None)
        return problem(http_status(exc), exc.code, exc.message, headers=headers)
    if isinstance(exc, HsmError):
        return problem(http_status(exc), exc.code, str(exc))
    if isinstance(exc, RequestValidationError):
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        if errors and all(e["type"] == "bad_text" for e in errors):
            # Control characters in a text field (api/schemas.py: Text, PrintableText).
            return problem(
                422, "bad-text", "a text field holds characters it may not", errors=errors
            )
        return problem(422, "invalid-request", "the request is not valid", errors=errors)
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, f"http-{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        headers = dict(exc.headers) if exc.headers else None
        return problem(exc.status_code, code, detail, headers=headers)
    if isinstance(exc, DataError):
        # The database refused a value (e.g. NUL in PostgreSQL text) that no check
        # above it caught: the transaction rolled back, nothing was written.
        log.warning(
            "database refused a value on %s %s: %s", request.method, request.url.path, exc.orig
        )
        return problem(400, "bad-input", "the database refused a value of the request")
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "internal-error", "the station hit an unexpected error")


async def _handler(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(request, exc)


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; code is the station's stable reason code",
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "code": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]*$"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
}
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def _problem_response(description: str, codes: tuple[str, ...] = ()) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": _PROBLEM_REF}
    if codes:
        media["examples"] = {
            code: {"value": {"type": TYPE_BASE + code, "code": code}} for code in codes
        }
    return {"description": description, "content": {PROBLEM_JSON: media}}


def _documented_errors(path: str, method: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """The errors a /v1 route answers with, each with example reason codes (its type is
    ``urn:station:problem:<code>``)."""
    errors: list[tuple[str, str, tuple[str, ...]]] = [
        ("401", "no bearer token, or one the ledger does not know", ("unauthorized",))
    ]
    if path != "/v1/ca":  # every role may read the CA
        errors.append(("403", "the token's role may not call this route", ("forbidden",)))
    if "{" in path:
        errors.append(
            ("404", "no such batch or board", ("unknown-batch", "unknown-device", "not-found"))
        )
    if method == "post":
        errors.append(
            (
                "409",
                "the ledger's state forbids it now",
                ("batch-full", "batch-closed", "already-provisioned", "token-exists"),
            )
        )
    errors.append(
        (
            "422",
            "the request is not valid, or policy refuses it",
            ("invalid-request", "bad-text", "subject-mismatch"),
        )
    )
    return errors


def _not_null(parameter: dict[str, Any]) -> None:
    """An optional query parameter is absent or a value, never null: document the value.

    (``str | None`` gives ``anyOf: [string, null]``; a client cannot send a null in a
    query string, and fuzzers that try dropped the parameter, sending a valid request.)"""
    schema = parameter.get("schema", {})
    options = [o for o in schema.get("anyOf", ()) if o.get("type") != "null"]
    if len(options) == 1 and len(options) < len(schema["anyOf"]):
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        parameter["schema"] = {**options[0], **rest}


def _no_control_characters(schema: dict[str, Any]) -> None:
    """A string parameter may not hold a control character (api.middleware)."""
    for option in (schema, *schema.get("anyOf", ())):
        if option.get("type") == "string" and not {"enum", "pattern"} & option.keys():
            option["pattern"] = CONTROL_CHARACTERS_PATTERN


def document(app: FastAPI) -> None:
    """Say in the OpenAPI schema what the handler does: every error is problem+json.

    Each operation gets a ``default`` problem response (401, 403, 404, 409, 413,
    415, 503, ... with the reason code in ``code``), and FastAPI's own 422
    (documented as its HTTPValidationError JSON) is replaced by the problem. String
    path and query parameters get the pattern the middleware enforces (no control
    characters)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if getattr(app.state, "problems_documented", False) and app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Problem"] = PROBLEM_SCHEMA
        for path, path_item in schema.get("paths", {}).items():
            for method, operation in path_item.items():
                responses = operation.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = _problem_response("the request is not valid")
                if path.startswith("/v1/"):
                    for status, description, codes in _documented_errors(path, method):
                        responses[status] = _problem_response(description, codes)
                for status, response in responses.items():
                    if status.startswith(("4", "5")) and "content" not in response:
                        response["content"] = {PROBLEM_JSON: {"schema": _PROBLEM_REF}}
                responses.setdefault("default", _problem_response("an error (problem details)"))
                for parameter in operation.get("parameters", ()):
                    if parameter.get("in") == "query":
                        _not_null(parameter)
                    if parameter.get("in") in ("path", "query"):
                        _no_control_characters(parameter.get("schema", {}))
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        app.state.problems_documented = True
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    document(app)
    for exc_type in (
        StationError,
        HsmError,
        RequestValidationError,
        StarletteHTTPException,
        DataError,
        Exception,
    ):
        app.add_exception_handler(exc_type, _handler)
