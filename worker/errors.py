"""The worker's errors, and how an exception is sorted.

    WorkerError
     ├── BrokerError           RabbitMQ (raised by worker.rabbit only)
     │    └── ConnectionLost   the connection or channel is gone: reconnect
     ├── PublishNotConfirmed   the broker nacked or did not confirm in time
     ├── ConcurrentUpdate      a guarded UPDATE lost its race: retry
     └── StopRequested         stopping during an outage: leave the work unacked

``classify`` decides by class, never by message text (SQLSTATE codes are
part of the class here: psycopg2 maps them to its own exception classes).
"""

from __future__ import annotations

import enum

import psycopg2.errors
from sqlalchemy import exc as sa_exc


class WorkerError(Exception):
    pass


class BrokerError(WorkerError):
    pass


class ConnectionLost(BrokerError):
    pass


class PublishNotConfirmed(BrokerError):
    pass


class ConcurrentUpdate(WorkerError):
    pass


class StopRequested(WorkerError):
    """Asked to stop while holding unfinished work: close without acking it."""


class Kind(enum.Enum):
    OUTAGE = "outage"  # a dependency is down: stop pulling, probe, hold the work
    TRANSIENT = "transient"  # may pass on its own: retry in place, then delay queues
    PERMANENT = "permanent"  # will fail again: retry tiers, then dead-letter


_TRANSIENT_PG = (
    psycopg2.errors.DeadlockDetected,
    psycopg2.errors.SerializationFailure,
    psycopg2.errors.LockNotAvailable,
    psycopg2.errors.QueryCanceled,
    psycopg2.errors.UniqueViolation,  # two batches inserted the same new row
)


def classify(exc: BaseException) -> Kind:
    """Sort an exception raised while applying commands."""
    if isinstance(exc, (ConcurrentUpdate, BrokerError)):
        return Kind.TRANSIENT
    if isinstance(exc, sa_exc.DBAPIError):
        if (
            exc.connection_invalidated
            or isinstance(exc.orig, psycopg2.OperationalError)
            and not isinstance(exc.orig, _TRANSIENT_PG)
        ):
            return Kind.OUTAGE
        if isinstance(exc.orig, _TRANSIENT_PG):
            return Kind.TRANSIENT
    if isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError, ConnectionError)):
        return Kind.OUTAGE
    return Kind.PERMANENT
