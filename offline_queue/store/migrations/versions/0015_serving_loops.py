"""serving loops: GPUs pull work from one queue; shards, GPU seats and engine shares go

Revision ID: 0015
Revises: 0014

A batch is routed to an engine (`route`) and waits in the queue; each GPU's serving loop claims
the next chunk of any batch on its route, by tier, deadline and weighted fair share (`vtime`).
The loops are rows of their own (`serving_loops`), beaten by their heartbeat. Shards' GPU seats
and engine shares are replaced by that claim order and by vLLM's request priority.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("route", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("vtime", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("waiting_reason", sa.Text(), nullable=True))
    op.create_index("ix_batches_route_status", "batches", ["route", "status"])
    with op.batch_alter_table("engine_time") as batch_op:
        batch_op.add_column(sa.Column("loop", sa.String(length=128), nullable=True))
    op.create_table(
        "serving_loops",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("route", sa.String(length=512), nullable=False),
        sa.Column("devices", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.String(length=256), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat", sa.Float(), nullable=False),
        sa.Column("draining", sa.Boolean(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_serving_loops_route", "serving_loops", ["route", "heartbeat"])
    op.drop_index("ix_gpu_seats_heartbeat", table_name="gpu_seats")
    op.drop_index("ix_gpu_seats_batch_id", table_name="gpu_seats")
    op.drop_table("gpu_seats")
    op.drop_index("ix_engine_shares_heartbeat", table_name="engine_shares")
    op.drop_table("engine_shares")


def downgrade() -> None:
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
    op.drop_index("ix_serving_loops_route", table_name="serving_loops")
    op.drop_table("serving_loops")
    with op.batch_alter_table("engine_time") as batch_op:
        batch_op.drop_column("loop")
    op.drop_index("ix_batches_route_status", table_name="batches")
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_column("waiting_reason")
        batch_op.drop_column("vtime")
        batch_op.drop_column("route")
