"""Governance: approvals, freezes, operator tenants, token issuers, the end user a run acts for.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column(
        "tenants", sa.Column("operator", sa.Boolean(), nullable=False, server_default="false")
    )
    op.add_column("runs", sa.Column("on_behalf_of", sa.String(200), nullable=True))
    op.add_column("api_tokens", sa.Column("issued_by", sa.String(40), nullable=True))
    op.create_table(
        "approvals",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("run_id", sa.String(40), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("node_id", sa.String(100), nullable=False),
        sa.Column("tool", sa.String(63), nullable=False),
        sa.Column("args_sha256", sa.String(64), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("decision_id", sa.String(40), nullable=False),
        sa.Column("policies", JSONB(), nullable=False),
        sa.Column("requested_by", sa.String(40), sa.ForeignKey("principals.id"), nullable=False),
        sa.Column("requested_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("decided_by", sa.String(40), sa.ForeignKey("principals.id"), nullable=True),
        sa.Column("decided_at", TZ, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("used_at", TZ, nullable=True),
        sa.UniqueConstraint("run_id", "node_id"),
    )
    op.create_index("ix_approvals_tenant_status", "approvals", ["tenant_id", "status"])
    op.create_table(
        "freezes",
        sa.Column("scope", sa.String(40), primary_key=True),
        sa.Column("frozen_by", sa.String(250), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("frozen_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("freezes")
    op.drop_index("ix_approvals_tenant_status", table_name="approvals")
    op.drop_table("approvals")
    op.drop_column("api_tokens", "issued_by")
    op.drop_column("runs", "on_behalf_of")
    op.drop_column("tenants", "operator")
