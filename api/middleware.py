"""Pure ASGI middleware: request body limit enforced on the stream, not only Content-Length;
no control characters in the path or the query; security headers on every answer."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import PROBLEM_JSON, TYPE_BASE, BodyTooLarge, problem
from station.policy import has_control_characters


class PlainTextParamsMiddleware:
    """Refuse a control character (C0 or DEL, e.g. ``%00``) in the path or the query with
    422 problem+json (bad-text), for every route, before routing and authentication.

    No path or query parameter takes one: a device id, a batch name, a state, a format.
    PostgreSQL text cannot hold NUL (the ledger answered 500), and SQLite stored it.
    JSON bodies are checked by their schemas (api/schemas.py: Text, PrintableText).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _control_in_path_or_query(scope):
            response = problem(
                422, "bad-text", "the path or the query holds a control character (U+0000-U+001F)"
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _control_in_path_or_query(scope: Scope) -> bool:
    if has_control_characters(scope.get("path", "")):
        return True
    query: bytes = scope.get("query_string", b"")
    if not query:
        return False
    # Decoded as Starlette decodes request.query_params (names too: none may hold one).
    return any(
        has_control_characters(name) or has_control_characters(value)
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    )


class BodyLimitMiddleware:
    """Refuse request bodies larger than ``max_bytes`` with 413 problem+json (body-too-large).

    A declared Content-Length over the limit is refused before anything is read;
    otherwise the bytes are counted as the app reads them, and the read that
    crosses the limit raises :class:`BodyTooLarge` (turned into the 413 by the
    problem handler, or here if it escapes before a response started).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "type": TYPE_BASE + "body-too-large",
                "title": "Content Too Large",
                "status": 413,
                "detail": f"the request body exceeds {self.max_bytes} bytes",
                "code": "body-too-large",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# The dashboard loads only its own files (no inline script or style, no CDN); no
# page of the station may be framed (clickjacking an operator's session).
DEFAULT_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# A QA report: inline style and data: charts, nothing that runs.
REPORT_CSP = (
    "default-src 'none'; script-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class SecurityHeadersMiddleware:
    """``X-Content-Type-Options: nosniff`` on every answer; on HTML answers also
    ``X-Frame-Options: DENY`` and a Content-Security-Policy (DEFAULT_CSP unless the
    route set its own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                names = {name.lower() for name, _ in headers}
                headers.append((b"x-content-type-options", b"nosniff"))
                ctype = next((v for n, v in headers if n.lower() == b"content-type"), b"")
                if ctype.lower().startswith(b"text/html"):
                    if b"x-frame-options" not in names:
                        headers.append((b"x-frame-options", b"DENY"))
                    if b"content-security-policy" not in names:
                        headers.append((b"content-security-policy", DEFAULT_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
