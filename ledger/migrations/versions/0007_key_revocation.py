"""Key revocation: ``signing_keys.revoked_at`` and ``revoked_reason``, kept for good.

A revoked key verifies nothing that the control receives from ``revoked_at`` on.
A trigger refuses an update that clears a revocation or moves it later, and the
deletion of a revoked key's row, so that no sync or bug of the application can
un-revoke a key (a superuser still can; the ledger's KeyRevoked events remain).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TRIGGER = """
CREATE FUNCTION toolplane_keep_revocation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    IF OLD.revoked_at IS NOT NULL THEN
      RAISE EXCEPTION 'signing key %: a revoked key is never deleted', OLD.key_id;
    END IF;
    RETURN OLD;
  END IF;
  IF OLD.revoked_at IS NOT NULL
     AND (NEW.revoked_at IS NULL OR NEW.revoked_at > OLD.revoked_at) THEN
    RAISE EXCEPTION 'signing key %: a revocation is never cleared or moved later', OLD.key_id;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER signing_keys_keep_revocation BEFORE UPDATE OR DELETE ON signing_keys
  FOR EACH ROW EXECUTE FUNCTION toolplane_keep_revocation();
"""


def upgrade() -> None:
    op.add_column("signing_keys", sa.Column("revoked_at", sa.DateTime(timezone=True)))
    op.add_column("signing_keys", sa.Column("revoked_reason", sa.Text()))
    op.execute(TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS signing_keys_keep_revocation ON signing_keys")
    op.execute("DROP FUNCTION IF EXISTS toolplane_keep_revocation()")
    op.drop_column("signing_keys", "revoked_reason")
    op.drop_column("signing_keys", "revoked_at")
