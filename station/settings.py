"""Station settings, read from environment variables prefixed ``STATION_``.

Every setting has a default that works for a development station: the data
directory ``./var`` holds the development SoftHSM2 token, the CA certificate,
the SQLite ledger and AWS registration state.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    max_body_bytes: int = Field(default=65536, description="Largest HTTP request body accepted.")
    auth_failures_per_minute: int = Field(
        default=30,
        ge=1,
        description="Failed HTTP authentications an address may make in a minute before it "
        "is answered 429 (per worker process).",
    )

    @property
    def ca_cert_path(self) -> Path:
        return self.data_dir / "ca.pem"

    @property
    def ca_key_uri_path(self) -> Path:
        return self.data_dir / "ca-key.uri"

    @property
    def token_dir(self) -> Path:
        return self.data_dir / "softhsm"

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
