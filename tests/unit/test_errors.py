"""``worker.errors.classify``: which errors are an outage, which pass on their own, which never will.

One row per error the worker meets, built as it is raised in practice:
psycopg2's class for the server's SQLSTATE (``psycopg2.errors.lookup``, the
table psycopg2 itself raises from), wrapped by SQLAlchemy the way
``Connection._handle_dbapi_exception`` wraps it (``DBAPIError.instance``, with
``connection_invalidated`` from the dialect's own ``is_disconnect``); pika's
errors as ``worker.rabbit`` turns them into ``ConnectionLost`` at its border.
The connection refused is a real one, from a port nothing listens on.

What each kind means: an OUTAGE holds the work (unacked) and waits for the
database without spending a retry tier; TRANSIENT is retried in place, then
through the delay tiers; PERMANENT goes through the delay tiers, then to the
dead-letter queue.
"""

from __future__ import annotations

import socket

import pika.exceptions
import psycopg2
import psycopg2.errors
import pytest
from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc

from handlers.errors import Refused
from handlers.payments.base import TransientPaymentError
from worker import errors
from worker.errors import ConcurrentUpdate, Kind, PublishNotConfirmed, classify
from worker.rabbit.connection import lost

#: SQLAlchemy's psycopg2 dialect (no connection made): it decides ``connection_invalidated``
DIALECT = create_engine("postgresql+psycopg2://orders@127.0.0.1/orders").dialect
STATEMENT = "UPDATE orders SET status = %(status)s WHERE order_id = %(order_id)s"


def server_error(sqlstate: str, message: str) -> psycopg2.Error:
    """The psycopg2 exception the server's ``sqlstate`` is raised as."""
    return psycopg2.errors.lookup(sqlstate)(message)


def wrapped(orig: Exception) -> sa_exc.DBAPIError:
    """``orig`` as SQLAlchemy raises it from ``Connection.execute``."""
    return sa_exc.DBAPIError.instance(
        STATEMENT,
        {"status": "paid", "order_id": "o-1"},
        orig,
        psycopg2.Error,
        connection_invalidated=DIALECT.is_disconnect(orig, None, None),
    )


def refused_connection() -> sa_exc.DBAPIError:
    """A real connection refused: ``engine.connect()`` to a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = create_engine(f"postgresql+psycopg2://orders@127.0.0.1:{port}/orders")
    try:
        with engine.connect():
            pass
    except sa_exc.DBAPIError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError(f"something answers on 127.0.0.1:{port}")


OUTAGE = {
    "connection refused (PostgreSQL down)": lambda: refused_connection(),
    "server closed the connection unexpectedly (PostgreSQL killed)": lambda: wrapped(
        psycopg2.OperationalError(
            "server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally"
        )
    ),
    "57P01 admin shutdown (pg_terminate_backend, fast shutdown)": lambda: wrapped(
        server_error("57P01", "terminating connection due to administrator command")
    ),
    "57P02 crash shutdown": lambda: wrapped(
        server_error("57P02", "terminating connection because of crash of another server process")
    ),
    "57P03 cannot connect now (starting up, shutting down)": lambda: wrapped(
        server_error("57P03", "the database system is starting up")
    ),
    "53300 too many connections": lambda: wrapped(server_error("53300", "sorry, too many clients already")),
    "53100 disk full": lambda: wrapped(server_error("53100", "could not extend file: No space left on device")),
    "08006 connection failure": lambda: wrapped(server_error("08006", "could not receive data from server")),
    "connection already closed (a pooled connection that died)": lambda: wrapped(
        psycopg2.InterfaceError("connection already closed")
    ),
    "SQLAlchemy pool timeout (every connection taken)": lambda: sa_exc.TimeoutError(
        "QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00"
    ),
    "SQLAlchemy disconnection (pre-ping)": lambda: sa_exc.DisconnectionError("connection invalidated by pre-ping"),
    "a socket error outside the driver": lambda: ConnectionResetError(104, "Connection reset by peer"),
}

TRANSIENT = {
    "40P01 deadlock detected": lambda: wrapped(server_error("40P01", "deadlock detected")),
    "40001 serialization failure": lambda: wrapped(
        server_error("40001", "could not serialize access due to concurrent update")
    ),
    "55P03 lock not available (lock_timeout)": lambda: wrapped(
        server_error("55P03", 'could not obtain lock on row in relation "orders"')
    ),
    "57014 query canceled (statement_timeout)": lambda: wrapped(
        server_error("57014", "canceling statement due to statement timeout")
    ),
    "23505 unique violation (two batches inserted the same new row)": lambda: wrapped(
        server_error("23505", 'duplicate key value violates unique constraint "inbox_pkey"')
    ),
    "a guarded UPDATE lost its race": lambda: ConcurrentUpdate("order o-1 changed under us"),
    "RabbitMQ connection lost (StreamLostError)": lambda: lost(
        pika.exceptions.StreamLostError("Transport indicated EOF")
    ),
    "RabbitMQ closed the connection (node shutting down)": lambda: lost(
        pika.exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED - broker forced connection closure")
    ),
    "RabbitMQ heartbeat missed": lambda: lost(pika.exceptions.AMQPHeartbeatTimeout("No activity for 60 seconds")),
    "RabbitMQ socket reset": lambda: lost(ConnectionResetError(104, "Connection reset by peer")),
    "a publish nacked or not confirmed": lambda: PublishNotConfirmed("orders.delay/orders.place: NackError"),
}

PERMANENT = {
    "23503 foreign key violation": lambda: wrapped(
        server_error("23503", 'insert or update on table "order_lines" violates foreign key constraint')
    ),
    "23514 check violation": lambda: wrapped(
        server_error("23514", 'new row for relation "products" violates check constraint "stock_nonnegative"')
    ),
    "42P01 undefined table (not migrated)": lambda: wrapped(server_error("42P01", 'relation "inbox" does not exist')),
    "22003 numeric value out of range": lambda: wrapped(server_error("22003", "integer out of range")),
    "XX000 internal error": lambda: wrapped(server_error("XX000", "cache lookup failed for relation 16384")),
    "a bug": lambda: KeyError("lines"),
    "a handler's refusal": lambda: Refused("not cancellable"),
    # the payment step retries a provider's 5xx in place; after that it is no outage of ours
    "a payment provider unavailable": lambda: TransientPaymentError("stripe: 503"),
}

TABLE = [(name, make, Kind.OUTAGE) for name, make in OUTAGE.items()]
TABLE += [(name, make, Kind.TRANSIENT) for name, make in TRANSIENT.items()]
TABLE += [(name, make, Kind.PERMANENT) for name, make in PERMANENT.items()]


@pytest.mark.parametrize(("make", "kind"), [(make, kind) for _, make, kind in TABLE], ids=[n for n, _, _ in TABLE])
def test_each_error_is_sorted_by_what_it_means(make, kind) -> None:
    assert classify(make()) is kind


def test_the_real_refused_connection_is_the_driver_s_operational_error() -> None:
    exc = refused_connection()
    assert isinstance(exc, sa_exc.OperationalError) and isinstance(exc.orig, psycopg2.OperationalError)
    assert "refused" in str(exc.orig).lower()
    assert not exc.connection_invalidated  # an outage by its class, not by the flag


def test_a_transient_sqlstate_stays_transient_even_though_psycopg2_makes_it_an_operational_error() -> None:
    # DeadlockDetected, SerializationFailure, LockNotAvailable and QueryCanceled are OperationalErrors
    # in psycopg2, as is every outage: only their own class keeps them out of OUTAGE
    for sqlstate in ("40P01", "40001", "55P03", "57014"):
        exc = wrapped(server_error(sqlstate, "x"))
        assert isinstance(exc.orig, psycopg2.OperationalError)
        assert classify(exc) is Kind.TRANSIENT, sqlstate


def test_every_transient_sqlstate_the_worker_knows_has_a_row() -> None:
    rows = {type(make().orig) for make in TRANSIENT.values() if isinstance(make(), sa_exc.DBAPIError)}
    assert set(errors._TRANSIENT_PG) <= rows


def test_every_worker_error_has_a_row() -> None:
    def below(cls: type) -> set[type]:
        return {cls} | {c for sub in cls.__subclasses__() for c in below(sub)}

    known = {c for c in below(errors.WorkerError) if c.__module__ == errors.__name__}
    rows = {type(make()) for make in (*TRANSIENT.values(), *OUTAGE.values(), *PERMANENT.values())}
    # WorkerError and BrokerError are never raised themselves; StopRequested ends a session, never a message
    assert known - rows == {errors.WorkerError, errors.BrokerError, errors.StopRequested}
