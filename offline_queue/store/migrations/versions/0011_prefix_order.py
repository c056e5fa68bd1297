"""prefix order: each request's prefix key, and the claimable index in the order claims take

Revision ID: 0011
Revises: 0010

Claims hand out a batch's live requests by (prefix_key, id) so that requests sharing a prompt
prefix reach the engine together (offline_queue/prefix.py). The claimable index is rebuilt on
(batch_id, prefix_key, id): the claim's ORDER BY ... LIMIT then walks the index, as it walked
(batch_id, id) before. Rows queued before this migration get the key "-": they sort first,
in line order, as they were claimed before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE = sa.text("state IN ('queued', 'processing')")


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("prefix_key", sa.String(length=32), server_default="-", nullable=False)
        )
        batch_op.drop_index("ix_requests_claimable", postgresql_where=_LIVE, sqlite_where=_LIVE)
        batch_op.create_index(
            "ix_requests_claimable",
            ["batch_id", "prefix_key", "id"],
            unique=False,
            postgresql_where=_LIVE,
            sqlite_where=_LIVE,
        )


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index("ix_requests_claimable", postgresql_where=_LIVE, sqlite_where=_LIVE)
        batch_op.create_index(
            "ix_requests_claimable",
            ["batch_id", "id"],
            unique=False,
            postgresql_where=_LIVE,
            sqlite_where=_LIVE,
        )
        batch_op.drop_column("prefix_key")
