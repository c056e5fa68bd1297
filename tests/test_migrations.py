"""The migrations build the schema the code declares: a database migrated by Alembic (as the
product migrates on first use) has no difference from `tables.py` that autogenerate can see."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from offline_queue.store.db import get_engine, resolve_url
from offline_queue.store.tables import Base


def test_migrated_schema_matches_the_declared_tables(db_url: str) -> None:
    engine = get_engine(resolve_url(db_url))  # migrated to head on first use
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], "the migrations and tables.py disagree; add a migration:\n" + "\n".join(
        map(repr, diff)
    )
