"""Database engines and sessions for the web app and the server.

The web app's sessions join the request's transaction (zope.sqlalchemy),
the websocket server uses plain sessions in a thread pool. The embedded
default is a SQLite file; PostgreSQL works unchanged through the same
URL-based configuration (``postgresql+psycopg://...``).

"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker


def create_database_engine(dsn: str) -> Engine:
    """Return an engine for `dsn`, tuned for several processes at once.

    Query parameters are kept out of SQLAlchemy's error messages: they
    hold chat text and customer names, which must not reach a log.

    Raises:
        ValueError: if `dsn` is not a database URL.

    """
    if not isinstance(dsn, str) or '://' not in dsn:
        raise ValueError(
            'dsn must be a database URL such as sqlite:///chat.db or '
            'postgresql+psycopg://user@host/db'
        )

    if dsn.startswith('sqlite:'):
        path = dsn.removeprefix('sqlite:///')
        if path and path != dsn and not path.startswith(':'):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(
            dsn, connect_args={'timeout': 30, 'check_same_thread': False},
            hide_parameters=True,
        )
        event.listen(engine, 'connect', _sqlite_pragmas)
        event.listen(engine, 'begin', _sqlite_begin)
        return engine

    return create_engine(dsn, pool_pre_ping=True, hide_parameters=True)


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    # Let SQLAlchemy issue BEGIN itself (see _sqlite_begin), and let
    # readers and one writer work side by side across processes.
    connection.isolation_level = None
    cursor = connection.cursor()
    cursor.execute('PRAGMA journal_mode=WAL')
    cursor.execute('PRAGMA synchronous=NORMAL')
    cursor.execute('PRAGMA foreign_keys=ON')
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # Take the write lock at the start of every transaction, so that a
    # read-then-write (the next sequence number) cannot interleave with
    # another process's and fail on upgrade.
    connection.exec_driver_sql('BEGIN IMMEDIATE')


def transactional_session(dsn: str) -> scoped_session[Session]:
    """Return a thread-local session factory joined to `transaction`."""
    from zope.sqlalchemy import register

    factory = scoped_session(sessionmaker(bind=create_database_engine(dsn)))
    register(factory)
    return factory


def session_factory(dsn: str) -> sessionmaker[Session]:
    """Return a plain session factory, for the websocket server."""
    return sessionmaker(
        bind=create_database_engine(dsn), expire_on_commit=False
    )


#: The key of the PostgreSQL advisory lock held while creating tables.
_SCHEMA_LOCK = 0x6F6E65676F76


def create_tables(engine: Engine) -> None:
    """Create the chat's missing tables, safely when processes start
    together.

    ``create_all`` looks, then creates: two replicas (or a replica and
    the web app) starting at once on a fresh PostgreSQL database both
    find a table missing, and the second ``CREATE TABLE`` fails with a
    unique violation. A transaction-level advisory lock lets one look and
    create at a time; DDL is transactional there, so the next one finds
    the tables. SQLite serializes the transactions by itself.

    """
    from sqlalchemy import text

    from onegov.chat.models import Base

    with engine.begin() as connection:
        if connection.dialect.name == 'postgresql':
            connection.execute(
                text('SELECT pg_advisory_xact_lock(:key)'),
                {'key': _SCHEMA_LOCK},
            )
        Base.metadata.create_all(connection)
