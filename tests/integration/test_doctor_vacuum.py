"""``orders doctor`` on vacuum: autovacuum off, disabled on a table, or far behind on the churned tables;
and migration 0007, which sets their autovacuum thresholds, up and down."""

from __future__ import annotations

import re
from typing import Any

from alembic import command
from sqlalchemy import text

from scripts import harness
from tests.support import dead_outbox_rows
from worker import db
from worker.doctor import DEAD_ROWS_BEHIND, check_vacuum


def reloptions(engine: Any, table: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = CAST(:t AS regclass)"), {"t": table}
            ).scalar_one()
        )


def test_doctor_warns_when_the_outbox_is_far_behind_its_vacuum(settings, clean_db):
    with clean_db.begin() as conn:
        conn.execute(text("ALTER TABLE outbox SET (autovacuum_enabled = off)"))  # behind, even where autovacuum is on
    try:
        dead_outbox_rows(clean_db, DEAD_ROWS_BEHIND + 2000)
        found = [f for f in check_vacuum(settings) if f.check in ("vacuum", "autovacuum")]
        behind = [f for f in found if f.check == "vacuum" and f.detail.startswith("far behind")]
        assert len(behind) == 1, found
        dead = re.search(r"outbox: ([\d,]+) dead rows", behind[0].detail)
        assert dead and int(dead[1].replace(",", "")) >= DEAD_ROWS_BEHIND + 2000, behind[0].detail
        assert behind[0].warning and behind[0].ok  # worth knowing; the doctor still passes
        assert "VACUUM (ANALYZE)" in behind[0].fix
        disabled = [f for f in found if "disabled on outbox" in f.detail]
        assert disabled and "RESET (autovacuum_enabled)" in disabled[0].fix
        with clean_db.connect() as conn:
            on = conn.execute(text("SHOW autovacuum")).scalar_one() == "on"
        assert on or any(f.detail.startswith("autovacuum is off") for f in found), found
    finally:
        with clean_db.begin() as conn:
            conn.execute(text("ALTER TABLE outbox RESET (autovacuum_enabled)"))
        with clean_db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM outbox"))
            conn.execute(text("SELECT pg_stat_force_next_flush()"))
    assert not [f for f in check_vacuum(settings) if f.detail.startswith("far behind")]


def test_migration_0007_sets_and_resets_the_autovacuum_thresholds(settings):
    scratch = settings.database.model_copy(update={"dbname": f"{settings.database.dbname}_m0007"})
    harness.fresh_database(scratch)
    engine = db.make_engine(scratch, pool_size=1)
    try:
        assert "autovacuum_vacuum_threshold=1000" in reloptions(engine, "outbox")
        assert "autovacuum_vacuum_scale_factor=0" in reloptions(engine, "orders")
        assert "fillfactor=90" in reloptions(engine, "payments")
        assert "autovacuum_vacuum_insert_threshold=50000" in reloptions(engine, "order_transitions")
        cfg = db.alembic_config(engine)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0006")
        assert reloptions(engine, "outbox") == [] and reloptions(engine, "payments") == []
        db.migrate(engine)
        assert "autovacuum_vacuum_threshold=5000" in reloptions(engine, "inbox")
    finally:
        engine.dispose()
        harness.drop_database(scratch)
