"""stream entries: a Redis stream's entries in the queue, once per custom_id

Revision ID: 0017
Revises: 0016

A consumer group's entries become requests of batches with `source` = `stream`, served by the
loops like any other; `stream_entries` finds a redelivered entry (same stream and custom_id) so
it is never queued twice, and records when its result went to the results stream.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("source", sa.String(length=16), nullable=True))
    op.create_table(
        "stream_entries",
        sa.Column("stream", sa.String(length=256), primary_key=True),
        sa.Column("custom_id", sa.String(length=512), primary_key=True),
        sa.Column("entry_id", sa.String(length=64), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("reply_to", sa.String(length=256), nullable=False),
        sa.Column("reply_owner", sa.String(length=128), nullable=True),
        sa.Column("reply_lease", sa.Float(), nullable=True),
        sa.Column("replied_at", sa.Float(), nullable=True),
    )
    op.create_index(
        "ix_stream_entries_unreplied",
        "stream_entries",
        ["stream", "batch_id"],
        sqlite_where=sa.text("replied_at IS NULL"),
        postgresql_where=sa.text("replied_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("stream_entries")
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_column("source")
