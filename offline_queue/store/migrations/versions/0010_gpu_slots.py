"""GPU seats: the shards holding or waiting for a node's GPUs, with their tier

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gpu_seats",
        sa.Column("gpu_limit", sa.String(length=255), nullable=False),
        sa.Column("shard", sa.String(length=128), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("tier", sa.Integer(), nullable=False),
        sa.Column("holding", sa.Boolean(), nullable=False),
        sa.Column("since", sa.Float(), nullable=False),
        sa.Column("heartbeat", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("gpu_limit", "shard"),
    )
    op.create_index("ix_gpu_seats_batch_id", "gpu_seats", ["batch_id"])
    op.create_index("ix_gpu_seats_heartbeat", "gpu_seats", ["heartbeat"])


def downgrade() -> None:
    op.drop_index("ix_gpu_seats_heartbeat", table_name="gpu_seats")
    op.drop_index("ix_gpu_seats_batch_id", table_name="gpu_seats")
    op.drop_table("gpu_seats")
