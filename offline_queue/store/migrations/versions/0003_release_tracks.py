"""release track and version of a batch (gray release)

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("release_track", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("release_version", sa.String(length=256), nullable=True))
        batch_op.create_index("ix_batches_release", ["release_track", "release_version"])


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_index("ix_batches_release")
        batch_op.drop_column("release_version")
        batch_op.drop_column("release_track")
