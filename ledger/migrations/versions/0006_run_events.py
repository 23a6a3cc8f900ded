"""Run events for followers; the environment a token acts in.

Every status change of a run or a node, in commit order, for followers:

A trigger on ``runs`` and ``nodes`` appends a row to ``run_events`` whenever a
status (or a node's attempt) changes, in the same transaction as the change, and
calls ``pg_notify('toolplane_run_events', run_id)``; PostgreSQL delivers the
notification only when that transaction commits. The API's event stream reads
the rows (its ids are the stream's event ids, so a follower that reconnects
with ``Last-Event-ID`` misses nothing) and wakes on the notifications instead of
polling. These rows are a view for followers, not evidence: the ledger is.
Changes of one run are made under its row lock, so their ids follow commit order.

``api_tokens.environment``: the environment an admin bound a token to; calls made
with it run there (or in a stricter one), whatever the caller asks.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TRIGGERS = """
CREATE FUNCTION toolplane_run_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_TABLE_NAME = 'runs' THEN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
      INSERT INTO run_events (run_id, node_id, status, attempt, at)
      VALUES (NEW.id, NULL, NEW.status, 0, clock_timestamp());
      PERFORM pg_notify('toolplane_run_events', NEW.id);
    END IF;
  ELSE
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status
       OR NEW.attempt IS DISTINCT FROM OLD.attempt THEN
      INSERT INTO run_events (run_id, node_id, status, attempt, at)
      VALUES (NEW.run_id, NEW.node_id, NEW.status, NEW.attempt, clock_timestamp());
      PERFORM pg_notify('toolplane_run_events', NEW.run_id);
    END IF;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER runs_run_event AFTER INSERT OR UPDATE OF status ON runs
  FOR EACH ROW EXECUTE FUNCTION toolplane_run_event();
CREATE TRIGGER nodes_run_event AFTER INSERT OR UPDATE OF status, attempt ON nodes
  FOR EACH ROW EXECUTE FUNCTION toolplane_run_event();
"""


def upgrade() -> None:
    op.create_table(
        "run_events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("node_id", sa.String(100), nullable=True),
        sa.Column("status", sa.String(30), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_run_events_run", "run_events", ["run_id", "id"])
    op.execute(TRIGGERS)
    op.add_column("api_tokens", sa.Column("environment", sa.String(40), nullable=True))


def downgrade() -> None:
    op.drop_column("api_tokens", "environment")
    op.execute("DROP TRIGGER IF EXISTS nodes_run_event ON nodes")
    op.execute("DROP TRIGGER IF EXISTS runs_run_event ON runs")
    op.execute("DROP FUNCTION IF EXISTS toolplane_run_event()")
    op.drop_index("ix_run_events_run", table_name="run_events")
    op.drop_table("run_events")
