"""ledger schema: batches, devices, certificates, whitelist, challenges, audit log, api tokens

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_tokens_token_sha256")),
    )
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("at", sa.String(length=40), nullable=False),
        sa.Column("station_id", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("entity", sa.String(length=256), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_log")),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("product", sa.String(length=128), nullable=False),
        sa.Column("planned_count", sa.Integer(), nullable=False),
        sa.Column("key_mode", sa.String(length=16), nullable=False),
        sa.Column("subject_template", sa.String(length=512), nullable=False),
        sa.Column("days", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("operator", sa.String(length=128), nullable=True),
        sa.Column("station_id", sa.String(length=128), nullable=False),
        sa.Column("device_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "key_mode IN ('board-ecc', 'see-rsa')", name=op.f("ck_batches_key_mode")
        ),
        sa.CheckConstraint("state IN ('open', 'closed')", name=op.f("ck_batches_state")),
        sa.CheckConstraint("days > 0", name=op.f("ck_batches_days")),
        sa.CheckConstraint("planned_count > 0", name=op.f("ck_batches_planned_count")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
        sa.UniqueConstraint("name", name=op.f("uq_batches_name")),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("failure_code", sa.String(length=64), nullable=True),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("station_id", sa.String(length=128), nullable=False),
        sa.Column("chain_sha256", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("installed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('new', 'key-ready', 'issued', 'installed', 'verified', 'failed', 'revoked')",
            name=op.f("ck_devices_state"),
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name=op.f("fk_devices_batch_id_batches")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("device_id", name=op.f("uq_devices_device_id")),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_devices_batch_id_state"), ["batch_id", "state"], unique=False
        )

    op.create_table(
        "certificates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("station_id", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("csr_der", sa.LargeBinary(), nullable=False),
        sa.Column("public_key_sha256", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=1024), nullable=False),
        sa.Column("sign_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("days", sa.Integer(), nullable=False),
        sa.Column("backdate_seconds", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pem", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoke_reason", sa.String(length=256), nullable=True),
        sa.Column("failure_code", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "state IN ('intent', 'issued', 'revoked', 'failed')", name=op.f("ck_certificates_state")
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name=op.f("fk_certificates_batch_id_batches")
        ),
        sa.ForeignKeyConstraint(
            ["device_pk"], ["devices.id"], name=op.f("fk_certificates_device_pk_devices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_certificates")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_certificates_fingerprint")),
        sa.UniqueConstraint("serial", name=op.f("uq_certificates_serial")),
    )
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_certificates_state_station_id"), ["state", "station_id"], unique=False
        )
        batch_op.create_index(
            "uq_certificates_live_device",
            ["device_pk"],
            unique=True,
            sqlite_where=sa.text("state IN ('intent', 'issued')"),
            postgresql_where=sa.text("state IN ('intent', 'issued')"),
        )
        batch_op.create_index(
            "uq_certificates_public_key_sha256",
            ["public_key_sha256"],
            unique=True,
            sqlite_where=sa.text("state <> 'failed'"),
            postgresql_where=sa.text("state <> 'failed'"),
        )

    op.create_table(
        "challenges",
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_pk"], ["devices.id"], name=op.f("fk_challenges_device_pk_devices")
        ),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_challenges")),
    )
    op.create_table(
        "whitelist",
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name=op.f("fk_whitelist_batch_id_batches")
        ),
        sa.ForeignKeyConstraint(
            ["device_pk"], ["devices.id"], name=op.f("fk_whitelist_device_pk_devices")
        ),
        sa.ForeignKeyConstraint(
            ["serial"], ["certificates.serial"], name=op.f("fk_whitelist_serial_certificates")
        ),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_whitelist")),
        sa.UniqueConstraint("device_pk", name=op.f("uq_whitelist_device_pk")),
    )
    with op.batch_alter_table("whitelist", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_whitelist_batch_id"), ["batch_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("whitelist", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_whitelist_batch_id"))

    op.drop_table("whitelist")
    op.drop_table("challenges")
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_certificates_public_key_sha256",
            sqlite_where=sa.text("state <> 'failed'"),
            postgresql_where=sa.text("state <> 'failed'"),
        )
        batch_op.drop_index(
            "uq_certificates_live_device",
            sqlite_where=sa.text("state IN ('intent', 'issued')"),
            postgresql_where=sa.text("state IN ('intent', 'issued')"),
        )
        batch_op.drop_index(batch_op.f("ix_certificates_state_station_id"))

    op.drop_table("certificates")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_batch_id_state"))

    op.drop_table("devices")
    op.drop_table("batches")
    op.drop_table("audit_log")
    op.drop_table("api_tokens")
