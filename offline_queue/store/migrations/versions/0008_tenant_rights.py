"""tenant rights: what a key may do, revoked keys, idempotency per tenant, a file's endpoint

Revision ID: 0008
Revises: 0007

A key carries its tenant's rights (allowed tiers, a weight cap, quotas; NULL: the server's
defaults) and can be revoked. An API batch's idempotency key was stored as "tenant:key" under
one unique constraint, so tenant `acme` with key `team:nightly` and tenant `acme:team` with key
`nightly` collided; it is now the tenant's own key, unique per (tenant, key). Batches run from
the CLI (no tenant) keep one key space: a unique index over their keys alone. A file records the
url of its first request line, so a batch cannot be created for another endpoint.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LOCAL = "tenant IS NULL"


def _drop_global_unique() -> None:
    """The unique constraint 0001 created without a name: PostgreSQL named it, SQLite did not
    (batch mode names it by a convention, then recreates the table without it)."""
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("batches_idempotency_key_key", "batches", type_="unique")
        return
    with op.batch_alter_table(
        "batches",
        recreate="always",
        naming_convention={"uq": "uq_%(table_name)s_%(column_0_name)s"},
    ) as batch_op:
        batch_op.drop_constraint("uq_batches_idempotency_key", type_="unique")


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.add_column(sa.Column("tiers", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("max_weight", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_waiting", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("max_stored_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("files") as batch_op:
        batch_op.add_column(sa.Column("endpoint", sa.String(length=64), nullable=True))
    _drop_global_unique()
    op.execute(
        "UPDATE batches SET idempotency_key = substr(idempotency_key, length(tenant) + 2) "
        "WHERE tenant IS NOT NULL AND idempotency_key IS NOT NULL"
    )
    with op.batch_alter_table("batches") as batch_op:
        batch_op.create_unique_constraint(
            "uq_batches_tenant_idempotency", ["tenant", "idempotency_key"]
        )
    op.create_index(
        "uq_batches_local_idempotency",
        "batches",
        ["idempotency_key"],
        unique=True,
        postgresql_where=sa.text(_LOCAL),
        sqlite_where=sa.text(_LOCAL),
    )


def downgrade() -> None:
    op.drop_index("uq_batches_local_idempotency", table_name="batches")
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_constraint("uq_batches_tenant_idempotency", type_="unique")
    op.execute(
        "UPDATE batches SET idempotency_key = tenant || ':' || idempotency_key "
        "WHERE tenant IS NOT NULL AND idempotency_key IS NOT NULL"
    )
    with op.batch_alter_table("batches") as batch_op:
        batch_op.create_unique_constraint("batches_idempotency_key_key", ["idempotency_key"])
    with op.batch_alter_table("files") as batch_op:
        batch_op.drop_column("endpoint")
    with op.batch_alter_table("api_keys") as batch_op:
        for column in ("revoked_at", "max_stored_bytes", "max_waiting", "max_weight", "tiers"):
            batch_op.drop_column(column)
