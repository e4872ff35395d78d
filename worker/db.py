"""PostgreSQL: engines and migrations."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
from alembic import command
from alembic.config import Config
from psycopg2 import sql
from sqlalchemy import Engine, create_engine, event

from worker.settings import DatabaseSettings

MIGRATIONS = Path(__file__).resolve().parent.parent / "schema" / "migrations"


def make_engine(db: DatabaseSettings, pool_size: int | None = None, pre_ping: bool = True) -> Engine:
    """An engine for one process; never create one at import time.

    ``pre_ping``: a round trip before every checkout, so a connection a restart or a failover killed is
    replaced before use.  The worker pool and the relay go without (a tenth of a payment step's time went
    into it): a dead connection fails its first statement as a lost one (``connection_invalidated``), which
    the worker holds as an outage and the relay reconnects from; the pool is emptied at once.
    """
    engine = create_engine(
        db.url,
        pool_size=pool_size or db.pool_size,
        pool_pre_ping=pre_ping,
        # UPDATE/DELETE executemany in pages instead of a round trip per row
        executemany_mode="values_plus_batch",
        connect_args={
            "connect_timeout": 5,
            "application_name": "orders",
            # a client that vanished mid-transaction (killed behind a proxy or NAT that hides
            # it) must not hold row locks forever; our transactions last milliseconds
            "options": "-c idle_in_transaction_session_timeout=60000",
        },
    )
    event.listen(engine, "handle_error", _demoted_primary_is_a_lost_connection)
    return engine


def _demoted_primary_is_a_lost_connection(context: Any) -> None:
    """A write refused as read-only means the server this pooled connection reaches is no longer the primary
    (it was demoted in a failover and came back as a standby): drop the connection, as for a lost one, so the
    next one finds the new primary (``target_session_attrs=read-write``) and the work is held, not failed."""
    if isinstance(context.original_exception, psycopg2.errors.ReadOnlySqlTransaction):
        context.is_disconnect = True


def ensure_database(db: DatabaseSettings) -> bool:
    """Create the database when it does not exist; True when created."""
    conn = psycopg2.connect(db.dsn.replace(f"dbname={db.dbname}", "dbname=postgres"), connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db.dbname,))
            if cur.fetchone():
                return False
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db.dbname)))
    finally:
        conn.close()
    if len(db.nodes) > 1:
        _wait_for_standbys(db)
    return True


def _wait_for_standbys(db: DatabaseSettings, timeout: float = 60.0) -> None:
    """Wait until the new database connects through every host.

    libpq tries the hosts in order and gives up at the first server that
    refuses the login itself, and a standby refuses a database it has not
    replayed yet, so right after CREATE DATABASE a standby listed before the
    primary fails every connection for a moment.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg2.connect(db.dsn, connect_timeout=5).close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def drop_database(db: DatabaseSettings) -> None:
    """Drop the database if it exists, closing its connections (tests, benchmarks, the chaos run)."""
    conn = psycopg2.connect(db.dsn.replace(f"dbname={db.dbname}", "dbname=postgres"), connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db.dbname)))
    finally:
        conn.close()


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def check_migrations(engine: Engine) -> None:
    """Raise when the models drifted from the migrations (alembic check)."""
    cfg = alembic_config(engine)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.check(cfg)
