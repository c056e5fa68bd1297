"""served model: the catalog entry a batch's lines name, and the catalog as the batch saw it

Revision ID: 0014
Revises: 0013

A line's `model` was ignored: the engine wrote its own name over it, so a line naming a model
nobody serves was answered by whatever was loaded. A batch run without an engine is now routed
by the model its lines name (offline_queue/catalog.py). The catalog is kept with the batch as it
was at submit, so a resumed ingest judges the rest of the file by the same entries even if the
catalog changed meanwhile.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("served_model", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("catalog_json", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_column("catalog_json")
        batch_op.drop_column("served_model")
