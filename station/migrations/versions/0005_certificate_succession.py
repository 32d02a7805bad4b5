"""field renewal (certificates.renews, states renewing and superseded); CMP transactions

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "state IN ('intent', 'issued', 'revoked', 'failed')"
NEW = "state IN ('intent', 'issued', 'revoked', 'failed', 'renewing', 'superseded')"


def upgrade() -> None:
    # batch mode: SQLite rebuilds the table (it cannot alter a CHECK in place).
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("renews", sa.String(length=40), nullable=True))
        batch_op.drop_constraint(batch_op.f("ck_certificates_state"), type_="check")
        batch_op.create_check_constraint(batch_op.f("ck_certificates_state"), NEW)
    op.create_table(
        "cmp_transactions",
        sa.Column("transaction_id", sa.String(length=64), nullable=False),
        sa.Column("sender_kid", sa.String(length=256), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("serial", sa.String(length=40), nullable=True),
        sa.Column("device_id", sa.String(length=128), nullable=True),
        sa.Column("our_nonce", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("transaction_id", name=op.f("pk_cmp_transactions")),
    )


def downgrade() -> None:
    op.drop_table("cmp_transactions")
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_certificates_state"), type_="check")
        batch_op.create_check_constraint(batch_op.f("ck_certificates_state"), OLD)
        batch_op.drop_column("renews")
