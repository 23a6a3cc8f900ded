"""Tool approvals: a worker's manifest takes effect only once the operator approved it.

``tool_announcements`` keeps each distinct manifest a worker announced (held until
approved); ``tool_approvals`` holds the operator's pin of each tool (the one digest
that may take effect); ``tool_manifests`` keeps only the manifest in force. The
manifests registered before this revision were trusted on announcement: they become
held announcements, and take effect again once approved (``toolplane up`` approves
those of the tools it starts from the code on its own host).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tool_announcements",
        sa.Column("tool", sa.String(length=63), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=40), nullable=False),
        sa.Column("manifest", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("key_id", sa.String(length=120), nullable=False),
        sa.Column("announced_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("problem", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("tool", "manifest_sha256"),
    )
    op.create_table(
        "tool_approvals",
        sa.Column("tool", sa.String(length=63), nullable=False),
        sa.Column("version", sa.String(length=40), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("approved_by", sa.String(length=250), nullable=False),
        sa.Column("via", sa.String(length=40), nullable=False),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tool"),
    )
    op.execute(
        "INSERT INTO tool_announcements"
        " (tool, manifest_sha256, version, manifest, key_id, announced_at)"
        " SELECT tool, manifest_sha256, version, manifest, key_id, registered_at"
        " FROM tool_manifests"
    )
    op.execute("DELETE FROM tool_manifests")


def downgrade() -> None:
    op.drop_table("tool_approvals")
    op.drop_table("tool_announcements")
