"""Engines and sessions for the ledger database (built by a composition root)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["make_engine", "make_sessionmaker", "normalize_url", "pipelined"]


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    return create_engine(
        normalize_url(url),
        pool_size=pool_size,
        max_overflow=5,
        # No ping per checkout (a round trip on every transaction): a connection
        # that died with the server fails its statement, and callers retry.
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5},
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def pipelined(session: Session, statements: list[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
    """Run ``statements`` (psycopg's ``%(name)s`` style) in the session's transaction, in
    order, each on its own (each with its own snapshot) but sent in one pipeline: one
    round trip to the server for all of them (a transaction that starts here has its
    ``BEGIN`` answered first: psycopg waits for it). Returns the rows of each (named
    tuples), ``[]`` for one without rows.

    Errors come as SQLAlchemy's, as if the statements had run through it."""
    connection = session.connection()
    driver = connection.connection.driver_connection
    assert driver is not None
    cursors = [driver.cursor(row_factory=namedtuple_row) for _ in statements]
    try:
        with driver.pipeline():
            for cursor, (sql, params) in zip(cursors, statements, strict=True):
                cursor.execute(sql, params)  # type: ignore[arg-type]  # our own constants
        return [cursor.fetchall() if cursor.description else [] for cursor in cursors]
    except psycopg.Error as e:
        failed = DBAPIError.instance(
            "; ".join(sql for sql, _ in statements),
            [params for _, params in statements],
            e,
            psycopg.Error,
            connection_invalidated=driver.closed or driver.broken,
        )
        if driver.closed or driver.broken:
            connection.invalidate(e)
        raise failed from e
    finally:
        for cursor in cursors:
            cursor.close()
