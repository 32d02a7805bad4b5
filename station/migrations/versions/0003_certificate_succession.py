"""field renewal: certificates.renews and the states renewing and superseded

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
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


def downgrade() -> None:
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_certificates_state"), type_="check")
        batch_op.create_check_constraint(batch_op.f("ck_certificates_state"), OLD)
        batch_op.drop_column("renews")
