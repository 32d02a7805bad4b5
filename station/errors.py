"""The station's one error vocabulary.

Every refusal the station makes carries a stable reason code (kebab-case, never
renamed once released) and a *kind* that says what sort of failure it is. The
kind is all the edges need: `api/problems.py` maps it to an HTTP status, the CLI
(`station/cli/common.py`) to its documented exit code, and the serial line sends
the code itself. Nothing in `station/` or `hsm/` knows an HTTP status.

`hsm/` and `firmware_hooks/` cannot import this module (they stay free of the
station), so their base errors carry the same two attributes, `code` and `kind`,
with the kind spelled as one of `Kind`'s values; `kind_of()` reads any of them.
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    """What sort of failure an error is; the edges map it, nothing else does."""

    BAD_INPUT = "bad-input"  # the request itself is malformed
    INVALID = "invalid"  # well-formed, but a value in it is not acceptable
    REFUSED = "refused"  # well-formed, but policy says no
    NOT_FOUND = "not-found"
    CONFLICT = "conflict"  # the ledger's state forbids it now
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    UNSUPPORTED_MEDIA = "unsupported-media"
    TOO_LARGE = "too-large"
    RATE_LIMITED = "rate-limited"
    UNAVAILABLE = "unavailable"  # a part (token, ledger, worker) cannot serve now
    UPSTREAM = "upstream"  # a remote service (AWS) refused or failed
    NOT_CONFIGURED = "not-configured"  # an operator must set something up
    IN_USE = "in-use"  # something the station must hold alone (a TCP port) is taken


class StationError(Exception):
    """Base of every error the station reports to a user, an operator or a board."""

    code: str = "station-error"
    kind: Kind = Kind.BAD_INPUT

    def __init__(self, message: str, *, code: str | None = None, kind: Kind | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if kind is not None:
            self.kind = kind

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    def __str__(self) -> str:
        return f"{self.code}: {self.args[0]}" if self.args else self.code


class PolicyError(StationError):
    """A CSR (or a request built around one) breaks a rule of the issuance policy."""

    code = "policy-violation"
    kind = Kind.REFUSED


class NotFoundError(StationError):
    code = "not-found"
    kind = Kind.NOT_FOUND


class ConflictError(StationError):
    code = "conflict"
    kind = Kind.CONFLICT


class UnavailableError(StationError):
    """A part the station needs (ledger, token, a worker) cannot serve right now."""

    code = "unavailable"
    kind = Kind.UNAVAILABLE


class ConfigurationError(StationError):
    """The station is not set up (no CA yet, bad settings): an operator must act."""

    code = "not-configured"
    kind = Kind.NOT_CONFIGURED


def kind_of(exc: BaseException) -> Kind | None:
    """The kind of any error that speaks the vocabulary (station, hsm, serial), else None."""
    kind = getattr(exc, "kind", None)
    if kind is None or not getattr(exc, "code", None):
        return None
    try:
        return Kind(kind)
    except ValueError:
        return None


def innermost(exc: BaseException) -> BaseException:
    """The innermost error of the vocabulary along ``exc``'s ``__cause__`` chain.

    A wrapper names the step that failed (``sign-failed``); its cause, when it
    speaks the vocabulary too (``hsm-key-not-found``), says what to fix.
    """
    found = exc
    cause = exc.__cause__
    while cause is not None:
        if kind_of(cause) is not None:
            found = cause
        cause = cause.__cause__
    return found
