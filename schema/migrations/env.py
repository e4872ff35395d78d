"""Alembic environment: runs the migrations on the connection handed in by
``worker.db.migrate`` (or on the URL of the settings when run by alembic's
own CLI)."""

from alembic import context
from sqlalchemy import create_engine

from schema.tables import metadata

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    from worker.settings import load_settings

    engine = create_engine(load_settings().database.url)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
