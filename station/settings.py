"""Station settings, read from environment variables prefixed ``STATION_``.

Every setting has a default that works for a development station: the data
directory ``./var`` holds the development SoftHSM2 token, the CA certificate,
the SQLite ledger and AWS registration state.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from station.errors import ConfigurationError
from station.policy import BATCH_NAME_RE

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# DynamoDB's rule for table names.
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}")
# AWS IoT's rule for policy names.
_POLICY_NAME = re.compile(r"[\w+=,.@-]{1,128}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STATION_", extra="ignore")

    data_dir: Path = Field(
        default=Path("./var"),
        description="Where the station keeps its CA certificate, ledger and dev token.",
    )
    ca_key_uri: str | None = Field(
        default=None,
        description="RFC 7512 pkcs11: URI of the CA key. Unset: the dev token made by "
        "`station init` (its URI is kept in DATA_DIR/ca-key.uri).",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the ledger. Unset: sqlite file DATA_DIR/ledger.sqlite.",
    )
    station_id: str = Field(
        default_factory=socket.gethostname,
        description="Name of this station, recorded with every batch and certificate.",
    )
    pkcs11_module: str = Field(
        default="/usr/lib/softhsm/libsofthsm2.so",
        description="PKCS#11 module used when the key URI names none.",
    )
    dev_token_label: str = Field(
        default="station-ca",
        description="Label of the development SoftHSM2 token `station init` makes.",
    )
    device_days: int = Field(default=3650, ge=1, le=36500, description="Device validity.")
    backdate_seconds: int = Field(
        default=300, ge=0, le=86400, description="Device not-before backdate for clock drift."
    )
    whitelist_table: str = Field(
        default="station-whitelist", description="DynamoDB table the JITR Lambda reads."
    )
    aws_sync_interval: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="Seconds between whitelist syncs that `station serve` runs (one worker "
        "does); unset: no sync loop in the server.",
    )
    aws_policy_name: str = Field(
        default="station-device",
        description="AWS IoT policy the sync attaches when it activates a certificate "
        "(the stack's DevicePolicyName).",
    )
    aws_topic_prefix: str = Field(
        default="things", description="The stack's TopicPrefix, for that policy's document."
    )
    max_body_bytes: int = Field(
        default=65536, ge=1024, le=64 * 1024 * 1024, description="Largest HTTP request body."
    )
    auth_failures_per_minute: int = Field(
        default=30,
        ge=1,
        description="Failed HTTP authentications an address may make in a minute before it "
        "is answered 429 (per worker process).",
    )
    tls_cert: Path | None = Field(
        default=None,
        description="PEM server certificate (chain) for HTTPS; with tls_key, `station serve` "
        "speaks TLS only.",
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")
    tls_client_certs: Literal["off", "optional", "required"] = Field(
        default="optional",
        description="Ask TLS clients for a certificate issued by the station's CA (EST "
        "re-enrolment): off, optional (checked when sent) or required.",
    )
    cmp_secrets: Path | None = Field(
        default=None,
        description="File (mode 0600) of `NAME TOKEN` lines: board tokens CMP clients use as "
        "their MAC secret (senderKID NAME). The ledger keeps only token hashes; a MAC needs "
        "the secret itself.",
    )
    est_default_batch: str | None = Field(
        default=None,
        description="Batch of EST requests without a label (/.well-known/est/simpleenroll).",
    )
    # NoDecode: a comma-separated list in the environment, not JSON.
    est_serverkeygen_batches: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description="Comma-separated batches whose boards may get a station-made key over "
        "EST serverkeygen (see-rsa batches; the key leaves the station). Empty: none.",
    )

    @field_validator("data_dir")
    @classmethod
    def _data_dir_usable(cls, value: Path) -> Path:
        # The nearest existing ancestor must be a directory: the station creates the rest.
        for parent in (value, *value.absolute().parents):
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"{parent} is not a directory")
                break
        return value

    @field_validator("ca_key_uri")
    @classmethod
    def _pkcs11_uri(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("pkcs11:"):
            raise ValueError("must be an RFC 7512 URI starting with 'pkcs11:'")
        return value

    @field_validator("database_url")
    @classmethod
    def _sqlalchemy_url(cls, value: str | None) -> str | None:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        if value is None:
            return None
        try:
            make_url(value)
        except ArgumentError:
            raise ValueError(
                "not a SQLAlchemy URL (e.g. sqlite:///path or postgresql+psycopg://user@host/db)"
            ) from None
        return value

    @field_validator("station_id", "dev_token_label")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value or _CONTROL.search(value):
            raise ValueError("must be non-empty printable text")
        return value

    @field_validator("dev_token_label")
    @classmethod
    def _token_label(cls, value: str) -> str:
        if len(value.encode()) > 32:
            raise ValueError("a PKCS#11 token label has at most 32 bytes")
        return value

    @field_validator("pkcs11_module")
    @classmethod
    def _absolute_module(cls, value: str) -> str:
        if not Path(value).is_absolute():
            raise ValueError("must be an absolute path to a PKCS#11 module")
        return value

    @field_validator("aws_policy_name")
    @classmethod
    def _policy_name(cls, value: str) -> str:
        if not _POLICY_NAME.fullmatch(value):
            raise ValueError("an AWS IoT policy name: 1-128 of letters, digits and _ + = , . @ -")
        return value

    @field_validator("aws_topic_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        if not value or _CONTROL.search(value) or set(value) & {"+", "#"}:
            raise ValueError("an MQTT topic prefix: printable, no wildcards (+ #)")
        return value

    @field_validator("tls_cert", "tls_key", "cmp_secrets")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @field_validator("est_default_batch")
    @classmethod
    def _batch_name(cls, value: str | None) -> str | None:
        if value is not None and BATCH_NAME_RE.fullmatch(value) is None:
            raise ValueError("a batch name: ASCII letters, digits, '.', '_' or '-'")
        return value

    @field_validator("est_serverkeygen_batches", mode="before")
    @classmethod
    def _batch_names(cls, value: object) -> object:
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        if isinstance(value, list | tuple | set | frozenset):
            for name in value:
                if not isinstance(name, str) or BATCH_NAME_RE.fullmatch(name) is None:
                    raise ValueError(
                        "comma-separated batch names: ASCII letters, digits, '.', '_' or '-'"
                    )
        return value

    @field_validator("whitelist_table")
    @classmethod
    def _table_name(cls, value: str) -> str:
        if not _TABLE_NAME.fullmatch(value):
            raise ValueError("a DynamoDB table name: 3-255 of A-Z a-z 0-9 _ . -")
        return value

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from the environment; a bad value is one :class:`ConfigurationError`.

        Its message names every bad ``STATION_*`` variable on one line, never
        echoes a value (a URL or a key URI may hold a password or a PIN).
        """
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigurationError(describe(exc), code="bad-setting") from None

    @property
    def ca_cert_path(self) -> Path:
        return self.data_dir / "ca.pem"

    @property
    def ca_key_uri_path(self) -> Path:
        return self.data_dir / "ca-key.uri"

    @property
    def token_dir(self) -> Path:
        return self.data_dir / "softhsm"

    @property
    def tls_dir(self) -> Path:
        """Where `station tls init` writes a development server key and certificate."""
        return self.data_dir / "tls"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ledger.sqlite').resolve()}"

    def resolved_ca_key_uri(self) -> str | None:
        if self.ca_key_uri:
            return self.ca_key_uri
        if self.ca_key_uri_path.exists():
            return self.ca_key_uri_path.read_text().strip() or None
        return None


def describe(exc: ValidationError) -> str:
    """One line naming each bad variable and why, without its value."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        name = "STATION_" + "_".join(str(p) for p in err["loc"]).upper()
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{name}: {_CONTROL.sub('?', msg)}")
    return "; ".join(parts)
