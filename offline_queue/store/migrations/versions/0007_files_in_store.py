"""files held in the store, and expiry of uploads and of batch outputs

Revision ID: 0007
Revises: 0006

Nodes share no disk: a file uploaded to one API host must be readable by a worker on another.
Its bytes go to `file_chunks` (about a MiB a row) and the `files` row says `writing` until the
upload is whole. Files and batch outputs may expire (OpenAI's `expires_after` and
`output_expires_after`); the clean-up stamps what it removed.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "file_chunks",
        sa.Column("file_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("file_id", "seq"),
    )
    with op.batch_alter_table("files") as batch_op:
        batch_op.add_column(
            sa.Column("status", sa.String(length=16), server_default="ready", nullable=False)
        )
        batch_op.add_column(sa.Column("expires_at", sa.BigInteger(), nullable=True))
        # A tenant's files are listed newest first (GET /v1/files).
        batch_op.drop_index("ix_files_tenant")
        batch_op.create_index("ix_files_tenant", ["tenant", "created_at"])
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("output_expires_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("outputs_removed_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_column("outputs_removed_at")
        batch_op.drop_column("output_expires_at")
    with op.batch_alter_table("files") as batch_op:
        batch_op.drop_index("ix_files_tenant")
        batch_op.create_index("ix_files_tenant", ["tenant"])
        batch_op.drop_column("expires_at")
        batch_op.drop_column("status")
    op.drop_table("file_chunks")
