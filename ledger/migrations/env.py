"""Alembic environment: the engine comes from ledger.migrate (config.attributes)."""

from __future__ import annotations

from alembic import context

from ledger.models import Base

config = context.config
engine = config.attributes["engine"]

with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()
