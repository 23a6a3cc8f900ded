"""Index nodes by envelope digest (refusals are bound by what the worker received).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_nodes_envelope_sha256", "nodes", ["envelope_sha256"])


def downgrade() -> None:
    op.drop_index("ix_nodes_envelope_sha256", table_name="nodes")
