"""engine time: engine-seconds per served chunk, and when a batch was first seen to be late

Revision ID: 0012
Revises: 0011

`engine_time` holds one row per served chunk: the engine-seconds the chunk used
(offline_queue/gpu_time.py), stamped by the store's clock; GPU time per batch and per tenant is a
sum over it. `batches.late_at` is set once, when a worker first estimates that the batch will
finish after its `expires_at` and raises the event that says so.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "engine_time",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("engine_key", sa.String(length=512), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_engine_time_batch", "engine_time", ["batch_id"])
    op.create_index("ix_engine_time_at", "engine_time", ["at"])
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("late_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("late_at")
    op.drop_index("ix_engine_time_at", table_name="engine_time")
    op.drop_index("ix_engine_time_batch", table_name="engine_time")
    op.drop_table("engine_time")
