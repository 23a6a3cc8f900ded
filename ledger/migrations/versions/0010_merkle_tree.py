"""Merkle trees over the evidence chains: the integrator's complete subtrees.

``merkle_nodes`` keeps, per chain, the hash of every complete subtree of the chain's
RFC 9162 Merkle tree (``level`` 0: the leaf hashes), written by the integrator after
the events were appended (never by the append itself); ``merkle_trees`` says how far
each chain is integrated, its root at that size and the hash of the last event taken.

Revision ID: 0010
Revises: 0010
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "merkle_nodes",
        sa.Column("chain_id", sa.String(60), primary_key=True),
        sa.Column("level", sa.SmallInteger(), primary_key=True),
        sa.Column("idx", sa.BigInteger(), primary_key=True),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "merkle_trees",
        sa.Column("chain_id", sa.String(60), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root", sa.LargeBinary(), nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("merkle_trees")
    op.drop_table("merkle_nodes")
