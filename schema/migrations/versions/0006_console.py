"""the operators' console: login links, previews, the dead-letter index

``console_logins`` keeps the SHA-256 of each one-time login link of
``orders console login`` (used once, across shim processes);
``console_previews`` the message ids an operator was shown before confirming
a replay or purge; ``dead_letter_index`` (with its groups, its count by minute and its one-row state) the
dead-letter queue as last read, so pages group 10,000 dead letters without
reading RabbitMQ.  New tables only: nothing the worker writes changes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 06:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_logins",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_console_logins")),
    )
    op.create_table(
        "console_previews",
        sa.Column("id", postgresql.UUID(as_uuid=False), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("message_ids", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_previews")),
    )
    op.create_table(
        "dead_letter_index",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("group_rank", sa.Integer(), nullable=False),
        sa.Column("copies", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.String(length=200), nullable=True),
        sa.Column("message_type", sa.String(length=100), nullable=True),
        sa.Column("original_queue", sa.String(length=200), nullable=True),
        sa.Column("error_class", sa.String(length=200), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("error_pattern", sa.Text(), nullable=False),
        sa.Column("group_key", sa.String(length=32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("landed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dead_lettered_by", sa.String(length=10), nullable=False),
        sa.Column("replay_count", sa.Integer(), nullable=False),
        sa.Column("delivery_count", sa.Integer(), nullable=False),
        sa.Column("order_id", postgresql.UUID(as_uuid=False), nullable=True),
        sa.Column("properties", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("headers", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("indexed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letter_index")),
    )
    op.create_index("ix_dead_letter_index_group_key", "dead_letter_index", ["group_key", "group_rank"])
    op.create_index("ix_dead_letter_index_order_id", "dead_letter_index", ["order_id"])
    op.create_index("ix_dead_letter_index_landed_at", "dead_letter_index", ["landed_at"])
    op.create_table(
        "dead_letter_groups",
        sa.Column("group_key", sa.String(length=32), nullable=False),
        sa.Column("original_queue", sa.String(length=200), nullable=True),
        sa.Column("error_class", sa.String(length=200), nullable=False),
        sa.Column("error_pattern", sa.Text(), nullable=False),
        sa.Column("example", sa.Text(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("ids", sa.Integer(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("types", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("repeated", sa.Integer(), nullable=False),
        sa.Column("max_deliveries", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("group_key", name=op.f("pk_dead_letter_groups")),
    )
    op.create_table(
        "dead_letter_minutes",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("minute", name=op.f("pk_dead_letter_minutes")),
    )
    op.create_table(
        "dead_letter_index_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("depth", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("duration_ms", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("stale", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("id = 1", name=op.f("ck_dead_letter_index_state_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letter_index_state")),
    )


def downgrade() -> None:
    op.drop_table("dead_letter_index_state")
    op.drop_table("dead_letter_minutes")
    op.drop_table("dead_letter_groups")
    op.drop_index("ix_dead_letter_index_landed_at", table_name="dead_letter_index")
    op.drop_index("ix_dead_letter_index_order_id", table_name="dead_letter_index")
    op.drop_index("ix_dead_letter_index_group_key", table_name="dead_letter_index")
    op.drop_table("dead_letter_index")
    op.drop_table("console_previews")
    op.drop_table("console_logins")
