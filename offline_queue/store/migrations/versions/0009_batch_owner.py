"""batch owner: who is running a batch, when it was last seen alive, and its lease

Revision ID: 0009
Revises: 0008

A batch whose run died (kill -9, a crashed node) stayed `validating` or `in_progress` with no
error anywhere a user looks. The run that works on a batch now beats a heartbeat on its row;
a reaper that finds a non-terminal batch whose owner has not been seen for longer than its
lease (and no request lease still alive) settles it as `failed` with the reason.
`owner_run_id` is the Prefect flow run that owns it, so Prefect's state hooks (cancelled,
crashed) find the batch of a flow run that never saw its own end.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("owner_run_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("owner_heartbeat", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("owner_lease", sa.Float(), nullable=True))
        batch_op.create_index("ix_batches_owner_run_id", ["owner_run_id"])


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_index("ix_batches_owner_run_id")
        batch_op.drop_column("owner_lease")
        batch_op.drop_column("owner_heartbeat")
        batch_op.drop_column("owner_run_id")
        batch_op.drop_column("owner")
