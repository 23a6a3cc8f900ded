"""Unverified results: each distinct message once, and a counter per problem.

``invalid_messages`` remembers each distinct message (by the SHA-256 of its content)
that ingest recorded as ``ToolReceiptInvalid`` or ``IngestFailed`` on the system chain,
so that a replayed copy is counted but not recorded again. ``invalid_message_counts``
keeps, per problem (``signature``, ``unbound``, ...), how many such messages arrived
and how many distinct ones were recorded: what an operator reads with
``toolplane ledger unverified``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "invalid_messages",
        sa.Column("message_sha256", sa.String(64), primary_key=True),
        sa.Column("evidence", sa.String(40), primary_key=True),
        sa.Column("problem", sa.String(40), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("first_at", TZ, nullable=False),
        sa.Column("last_at", TZ, nullable=False),
        sa.Column("seen", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "invalid_message_counts",
        sa.Column("problem", sa.String(40), primary_key=True),
        sa.Column("received", sa.BigInteger(), nullable=False),
        sa.Column("recorded", sa.BigInteger(), nullable=False),
        sa.Column("last_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("invalid_message_counts")
    op.drop_table("invalid_messages")
