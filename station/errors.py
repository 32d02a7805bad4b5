"""The station's typed errors.

Every refusal the station makes carries a stable reason code (kebab-case, never
renamed once released) and the HTTP status the web layer answers with, so the
CLI, the API and the serial line report the same failure the same way.
"""

from __future__ import annotations


class StationError(Exception):
    """Base of every error the station reports to a user, an operator or a board."""

    code: str = "station-error"
    http_status: int = 400

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    def __str__(self) -> str:
        return f"{self.code}: {self.args[0]}" if self.args else self.code


class PolicyError(StationError):
    """A CSR (or a request built around one) breaks a rule of the issuance policy."""

    code = "policy-violation"
    http_status = 422


class NotFoundError(StationError):
    code = "not-found"
    http_status = 404


class ConflictError(StationError):
    code = "conflict"
    http_status = 409


class ConfigurationError(StationError):
    """The station is not set up (no CA yet, bad settings): an operator must act."""

    code = "not-configured"
    http_status = 503
