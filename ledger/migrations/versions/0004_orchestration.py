"""Orchestration: workflow runs (spec, inputs), node dependencies and deadlines, attempts.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("runs", sa.Column("spec", JSONB(), nullable=True))
    op.add_column("runs", sa.Column("spec_sha256", sa.String(64), nullable=True))
    op.add_column("runs", sa.Column("inputs", JSONB(), nullable=True))
    op.add_column("runs", sa.Column("request_sha256", sa.String(64), nullable=True))
    op.add_column("nodes", sa.Column("needs", JSONB(), nullable=False, server_default="[]"))
    op.add_column("nodes", sa.Column("args_template", JSONB(), nullable=True))
    op.add_column("nodes", sa.Column("due_at", TZ, nullable=True))
    op.add_column("nodes", sa.Column("retry_at", TZ, nullable=True))
    op.add_column(
        "nodes", sa.Column("max_attempts", sa.Integer(), nullable=False, server_default="1")
    )
    op.alter_column("nodes", "args", nullable=True)
    op.alter_column("nodes", "args_sha256", nullable=True)
    op.create_index("ix_nodes_status_due", "nodes", ["status", "due_at"])
    op.create_index("ix_nodes_status_retry", "nodes", ["status", "retry_at"])
    op.create_table(
        "attempts",
        sa.Column("run_id", sa.String(40), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("node_id", sa.String(100), primary_key=True),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.String(200), nullable=False),
        sa.Column("envelope_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("dispatched_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
        sa.Column("due_at", TZ, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("settled_at", TZ, nullable=True),
    )
    # Jobs in flight across the upgrade: their results bind to an attempt, and an attempt
    # that never answers is overdue a minute after its envelope expired.
    op.execute(
        """
        INSERT INTO attempts (run_id, node_id, attempt, job_id, envelope_sha256,
                              dispatched_at, expires_at, due_at, status)
        SELECT run_id, node_id, attempt, run_id || '/' || node_id || '/' || attempt,
               envelope_sha256, updated_at,
               to_timestamp((envelope -> 'envelope' ->> 'expires_at')::bigint / 1000.0),
               to_timestamp((envelope -> 'envelope' ->> 'expires_at')::bigint / 1000.0)
                 + interval '60 seconds',
               'queued'
        FROM nodes
        WHERE status = 'queued' AND envelope_sha256 IS NOT NULL AND attempt > 0
        """
    )
    op.execute(
        """
        UPDATE nodes SET due_at = a.due_at FROM attempts a
        WHERE a.run_id = nodes.run_id AND a.node_id = nodes.node_id AND a.attempt = nodes.attempt
        """
    )


def downgrade() -> None:
    op.drop_table("attempts")
    op.drop_index("ix_nodes_status_retry", "nodes")
    op.drop_index("ix_nodes_status_due", "nodes")
    for column in ("max_attempts", "retry_at", "due_at", "args_template", "needs"):
        op.drop_column("nodes", column)
    for column in ("request_sha256", "inputs", "spec_sha256", "spec"):
        op.drop_column("runs", column)
