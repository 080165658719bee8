"""Engines and sessions, built from :class:`~backend.settings.Settings` (never at import time).

SQLite (local mode): WAL journal, foreign keys on, a busy timeout, and explicit ``BEGIN``
statements. Sessions made by :meth:`Database.write_session` start with ``BEGIN IMMEDIATE``,
so a request that reads and then writes takes the write lock up front and waits for it
(``busy_timeout``) instead of failing with "database is locked" when another writer committed
in between. Read sessions use a plain deferred ``BEGIN``.

PostgreSQL: psycopg 3 with a pool sized by ``PREFLOOP_DB_POOL_SIZE`` / ``DB_MAX_OVERFLOW``
(the API's thread pool has 40 workers; the defaults give each one a connection), pinged at
checkout (``pool_pre_ping``), so once the server is back after a restart no request fails;
while it is down, requests get 503 with ``Retry-After`` (:mod:`backend.api.errors`).

The caller owns the transaction: services flush, handlers commit.

The annotation hot paths (``GET /pairs/next``, ``POST /votes``) skip the ORM session: they run
all their work (user check, statements, commit, connection returned to the pool) as one call
on :meth:`Database.run`, a thread pool with one thread per pooled connection, on a
:meth:`Database.hot_connection`. One hop per request, and a thread never waits for a
connection that another request holds while itself waiting for a thread (which, with a
session opened in one hop and closed in another, deadlocked the pool until its 30 s timeout
under a few hundred concurrent requests).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from backend import staging
from backend.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 15000

T = TypeVar("T")


def make_engine(url: str, *, pool_size: int = 20, max_overflow: int = 20, **kw: Any) -> Engine:
    """An engine for ``url`` with Prefloop's per-dialect tuning."""
    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        database = sa_url.database
        if database and database != ":memory:":
            from pathlib import Path

            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            sa_url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size,
            max_overflow=max_overflow,
            **kw,
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(
        sa_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=1800,
        # A pooled connection is tested at checkout (one round trip, only when the pool
        # hands it out): after a PostgreSQL restart every stale connection is replaced
        # instead of failing the request that drew it.
        pool_pre_ping=True,
        **kw,
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module doc)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("prefloop_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """One engine plus read and write session factories."""

    def __init__(self, url: str, *, pool_size: int = 20, max_overflow: int = 20) -> None:
        self.engine = make_engine(url, pool_size=pool_size, max_overflow=max_overflow)
        self.dialect = self.engine.dialect.name
        self.write_engine = self.engine.execution_options(prefloop_write=True)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)
        for factory in (self._read, self._write):
            staging.install(factory)  # files of a transaction that does not commit go too
        # Not more threads than pooled connections: the hot paths never open overflow
        # connections (each costs a new PostgreSQL backend when the pool later drops it).
        self._threads = max(1, pool_size)
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(
            settings.db_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow
        )

    def read_session(self) -> Session:
        return self._read()

    def write_session(self) -> Session:
        return self._write()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write session that commits on success and rolls back on error."""
        with self.write_session() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def hot_connection(self, *, write: bool) -> Iterator[Connection]:
        """A Core connection for the hot paths, returned to the pool at the end.

        PostgreSQL: in autocommit mode, so each statement is its own transaction and no
        ``BEGIN`` / ``COMMIT`` round trips are spent. The hot paths are written for that:
        their only writes are single ``INSERT ... ON CONFLICT DO NOTHING`` statements, which
        commit (``synchronous_commit`` stays on: durable) before the statement returns, so
        before the 2xx; every read sees the latest committed rows, as each statement of a
        READ COMMITTED transaction did; the unique constraints arbitrate concurrent requests.

        SQLite: one transaction (``BEGIN IMMEDIATE`` when ``write``), committed on success
        and rolled back on error."""
        if self.dialect == "postgresql":
            with self.engine.connect() as conn:
                # psycopg's own switch: no round trip, and cheaper per checkout than
                # SQLAlchemy's isolation_level="AUTOCOMMIT" execution option. The
                # transaction SQLAlchemy "autobegins" is then only logical; its rollback at
                # close is a no-op on an idle connection.
                dbapi_conn: Any = conn.connection.dbapi_connection
                dbapi_conn.autocommit = True
                try:
                    yield conn
                finally:
                    try:
                        if not dbapi_conn.closed:
                            conn.rollback()
                            dbapi_conn.autocommit = False
                    except Exception:  # noqa: BLE001 - never hand back a connection in doubt
                        conn.invalidate()
            return
        with (self.write_engine if write else self.engine).connect() as conn, conn.begin():
            yield conn

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking database work ``fn(*args)`` on this database's thread pool (sized to
        the connection pool), with the caller's context variables (the request id)."""
        executor = self._executor
        if executor is None:
            executor = self._executor = ThreadPoolExecutor(
                max_workers=self._threads, thread_name_prefix="prefloop-db"
            )
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(executor, ctx.run, fn, *args)

    def dispose(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self.engine.dispose()
