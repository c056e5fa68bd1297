"""result cache: an entry points at the result row that holds the answer

Revision ID: 0006
Revises: 0005

The cache held a copy of every answer's body. Filling it on a fast engine (bench/ceiling.py,
550,000 answers) wrote ~200 MB, four fifths of it those copies, and held the store's one
writer for ~5 s; the answer is already in `results`, which is never pruned. The old entries
are dropped with the old table: a cache, recomputed on the next identical request.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_table("result_cache")
    op.create_table(
        "result_cache",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("result_cache")
    op.create_table(
        "result_cache",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
