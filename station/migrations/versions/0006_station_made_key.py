"""certificates.station_made_key: an intent whose key the station made (EST serverkeygen)

Recovery abandons such an intent instead of signing it again: the key lived only in
the memory of the process that crashed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite rebuilds the table; existing rows were all the board's keys.
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("station_made_key", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_column("station_made_key")
