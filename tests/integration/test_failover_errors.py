"""A pooled connection to a server that was demoted in a failover is dropped and its work held, not failed."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from worker.errors import Kind, classify


def test_a_write_refused_as_read_only_drops_the_connection_and_counts_as_an_outage(engine):
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        # what a pooled connection meets once its server came back as a standby
        conn.execute(text("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"))
        conn.commit()
        with pytest.raises(sa_exc.DBAPIError) as refused:
            conn.execute(text("INSERT INTO inbox (consumer, message_id) VALUES ('test', 'read-only')"))
    assert type(refused.value.orig).__name__ == "ReadOnlySqlTransaction"
    assert refused.value.connection_invalidated  # the pool drops it: the next connection finds the primary
    assert classify(refused.value) is Kind.OUTAGE  # held until the database answers, never dead-lettered
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
        assert conn.execute(text("SHOW transaction_read_only")).scalar_one() == "off"
