"""The ASGI TLS extension for uvicorn: a verified client certificate reaches the app.

uvicorn's HTTP protocols put no TLS details in the scope. This subclass of its
httptools protocol reads the peer certificate once per connection (the TLS
layer already checked its chain against the station's CA) and adds it to every
request's scope as ``scope["extensions"]["tls"]["client_cert_chain"]`` (PEM), as
the ASGI TLS extension names it. EST re-enrolment reads it there.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from starlette.requests import Request
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class TlsHttpToolsProtocol(HttpToolsProtocol):
    _client_chain: list[str]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._client_chain = []
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                self._client_chain = [ssl.DER_cert_to_PEM_cert(der)]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        scope: Any = self.scope
        if self.scheme == "https":
            scope["extensions"] = {"tls": {"client_cert_chain": list(self._client_chain)}}


def client_certificate_pem(request: Request) -> str | None:
    """The client's TLS certificate (PEM) the server verified, or None."""
    tls = request.scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return str(chain[0]) if chain else None
