"""Artifacts: a node whose result is kept in the artifact store holds its metadata.

``nodes.artifact`` is the metadata of the artifact (``sha256``, ``size``,
``media_type``, ``tool``, ``run_id``, ``node_id``; ledger/artifacts.py) of a result
kept outside the database; its ``result`` is then null.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "nodes",
        sa.Column("artifact", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("nodes", "artifact")
