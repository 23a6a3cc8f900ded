"""Releasing reservations: attempts not settled yet (partial index), an attempt's outbox row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_attempts_unsettled",
        "attempts",
        ["due_at"],
        postgresql_where=sa.text("settled_at IS NULL"),
    )
    op.create_index("ix_outbox_attempt", "outbox", ["run_id", "node_id", "attempt"])


def downgrade() -> None:
    op.drop_index("ix_outbox_attempt", table_name="outbox")
    op.drop_index("ix_attempts_unsettled", table_name="attempts")
