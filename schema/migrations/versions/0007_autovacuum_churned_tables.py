"""autovacuum storage parameters for the tables the service churns

PostgreSQL's defaults vacuum a table once its dead rows pass
``autovacuum_vacuum_threshold`` (50) + ``autovacuum_vacuum_scale_factor``
(0.2) x its rows.  That fraction is wrong both ways here:

- ``outbox`` holds a few hundred live rows and sees every event inserted and
  deleted (or marked) once: its row estimate swings with a backlog (a broker
  outage leaves a million rows; the threshold is then 200,000 dead rows long
  after the backlog is gone).  A fixed threshold (scale factor 0) of 1,000
  dead rows keeps it a few pages long.  The relay's keyset poll no longer
  walks its dead rows (worker/relay.py), but every other read does, and the
  heap and the partial index bloat until a vacuum.
- ``orders`` (two to four updates per order, none HOT: each changes the
  indexed status), ``payments`` (updated at each provider answer),
  ``inbox`` and ``order_history`` (deleted by the relay's housekeeping
  after their retention, a minute's worth at a time) grow without bound: 20%
  of ten million orders is two million dead rows before a vacuum starts.  A
  fixed threshold of 5,000 makes vacuum follow the churn instead of the
  table's size; each run stays cheap (the visibility map skips the settled
  pages, and PostgreSQL 14+ skips the index pass when few pages have dead
  rows).
- Append-only ``order_items`` and ``order_transitions`` (and ``inbox`` and
  ``order_history`` as they grow) are vacuumed after every 50,000 inserts
  (``autovacuum_vacuum_insert_*``, PostgreSQL 13+) whatever their size, so
  their visibility map stays current and freezing is spread out instead of
  arriving as one anti-wraparound vacuum.
- ``payments`` gets ``fillfactor = 90``: its updates that touch no indexed
  column (status, attempts, last_error, amounts) can then stay on their page
  as HOT updates (no index entries, no index bloat).  Not ``orders``: every
  update of an order changes its indexed status, so free space would buy no
  HOT update.  A new fillfactor applies to pages written from now on.

None of this matters while autovacuum is off (``SHOW autovacuum``) or held
back by a long transaction: ``orders doctor`` warns about both
(docs/operations.md).  The settings take a ``SHARE UPDATE EXCLUSIVE`` lock
for a moment: nothing the worker or relay does waits on it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 09:00:00
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: per table: its storage parameters (the downgrade resets exactly these)
PARAMETERS: dict[str, dict[str, str]] = {
    "outbox": {"autovacuum_vacuum_scale_factor": "0", "autovacuum_vacuum_threshold": "1000"},
    "orders": {"autovacuum_vacuum_scale_factor": "0", "autovacuum_vacuum_threshold": "5000"},
    "payments": {"autovacuum_vacuum_scale_factor": "0", "autovacuum_vacuum_threshold": "5000", "fillfactor": "90"},
    "inbox": {
        "autovacuum_vacuum_scale_factor": "0",
        "autovacuum_vacuum_threshold": "5000",
        "autovacuum_vacuum_insert_scale_factor": "0",
        "autovacuum_vacuum_insert_threshold": "50000",
    },
    "order_history": {
        "autovacuum_vacuum_scale_factor": "0",
        "autovacuum_vacuum_threshold": "5000",
        "autovacuum_vacuum_insert_scale_factor": "0",
        "autovacuum_vacuum_insert_threshold": "50000",
    },
    "order_items": {"autovacuum_vacuum_insert_scale_factor": "0", "autovacuum_vacuum_insert_threshold": "50000"},
    "order_transitions": {
        "autovacuum_vacuum_insert_scale_factor": "0",
        "autovacuum_vacuum_insert_threshold": "50000",
    },
}


def upgrade() -> None:
    for table, params in PARAMETERS.items():
        op.execute(f"ALTER TABLE {table} SET ({', '.join(f'{k} = {v}' for k, v in params.items())})")


def downgrade() -> None:
    for table, params in PARAMETERS.items():
        op.execute(f"ALTER TABLE {table} RESET ({', '.join(params)})")
