"""the HTTP API: API keys, uploaded files, tenants and windows on batches

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key_hash"),
    )
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_files_tenant", "files", ["tenant"])
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("tenant", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("input_file_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("completion_window", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("cancelling_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("cancelled_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("expired_at", sa.BigInteger(), nullable=True))
        batch_op.create_index("ix_batches_tenant_created", ["tenant", "created_at"])


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_index("ix_batches_tenant_created")
        for column in (
            "expired_at",
            "cancelled_at",
            "cancelling_at",
            "expires_at",
            "completion_window",
            "input_file_id",
            "tenant",
        ):
            batch_op.drop_column(column)
    op.drop_index("ix_files_tenant", table_name="files")
    op.drop_table("files")
    op.drop_table("api_keys")
