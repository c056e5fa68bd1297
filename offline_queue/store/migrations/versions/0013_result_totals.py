"""result totals: an ended batch's result rows added up once, for /metrics

Revision ID: 0013
Revises: 0012

A scrape of /metrics added up every result row ever written, so its cost grew with the
history: a year of nightly million-line batches is a third of a billion rows. An ended batch's
rows are added up once into `result_totals` (per outcome and error code, with tokens and the
latency histogram's buckets) and `batches.totals_at` says it was; a scrape reads those rows and
adds up only the batches still running.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "result_totals",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("model_version", sa.String(length=256), nullable=False),
        sa.Column("results", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("timed", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("buckets", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", "ok", "code"),
    )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("totals_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("totals_at")
    op.drop_table("result_totals")
