"""Database engine and sessions. PostgreSQL in production, SQLite in the embedded mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import ColumnElement, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 5, pool_timeout_s: float = 30.0) -> Engine:
    """An engine with an explicit connection pool: at most pool_size + max_overflow connections, and a request that
    finds none free waits pool_timeout_s, then fails (a 500 the client may retry) instead of queueing forever."""
    pool = {"pool_size": pool_size, "max_overflow": max_overflow, "pool_timeout": pool_timeout_s}
    if url.startswith("sqlite"):
        # One file shared by the API and a worker process: WAL lets readers run beside the writer, and a busy
        # timeout makes a writer wait for the lock instead of failing at once.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session for background work: commits at the end, rolls back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def owned_by(column: Any, value: Any) -> list[ColumnElement[bool]]:
    """`column = value`, written as `column >= value AND column <= value`, for a page of one owner's rows (a project's
    jobs, a job's events) ordered by (column, seq) along an index on (column, seq).

    The same rows; but with `=` PostgreSQL takes the column as a constant, drops it from the ORDER BY, and may then
    walk the primary key (seq) backwards, filtering, in the belief that the owner's rows are spread evenly through
    the table: for an old owner that reads every newer row of the table (thousands, or millions of events). With the
    range the (column, seq) index is the only one that gives the order, and the page reads its own rows."""
    return [column >= value, column <= value]
