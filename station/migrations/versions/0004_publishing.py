"""publishing: crls (the CRLs the station signed, newest served at GET /crl),
aws_certificate_status (the AWS IoT status a whitelist sync last saw of a revoked
certificate), and a batch's CRL and OCSP URLs for its device certificates

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("crl_url", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("ocsp_url", sa.String(length=512), nullable=True))
    op.create_table(
        "crls",
        sa.Column("number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("ca_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("this_update", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_update", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_count", sa.Integer(), nullable=False),
        sa.Column("station_id", sa.String(length=128), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("number", name=op.f("pk_crls")),
    )
    op.create_table(
        "aws_certificate_status",
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["serial"],
            ["certificates.serial"],
            name=op.f("fk_aws_certificate_status_serial_certificates"),
        ),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_aws_certificate_status")),
    )


def downgrade() -> None:
    op.drop_table("aws_certificate_status")
    op.drop_table("crls")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("ocsp_url")
        batch_op.drop_column("crl_url")
