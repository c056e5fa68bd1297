"""engine shares (batches using a shared engine), results.finished_at

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "engine_shares",
        sa.Column("engine_key", sa.String(length=512), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("tier", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.Column("heartbeat", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("engine_key", "batch_id", "owner"),
    )
    op.create_index("ix_engine_shares_heartbeat", "engine_shares", ["heartbeat"])
    with op.batch_alter_table("results") as batch_op:
        batch_op.add_column(sa.Column("finished_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results") as batch_op:
        batch_op.drop_column("finished_at")
    op.drop_index("ix_engine_shares_heartbeat", table_name="engine_shares")
    op.drop_table("engine_shares")
