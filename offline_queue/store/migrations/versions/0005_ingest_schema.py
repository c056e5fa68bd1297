"""ingest: no foreign keys to batches, no unique (batch_id, custom_id), lease-token index
over leased rows only

Revision ID: 0005
Revises: 0004

What PostgreSQL spent per row COPY'd into `requests` (200,000 rows, measured apart): the
foreign key's trigger, a lookup of the batch row, ~3.3 µs of ~9.3; the unique index on
(batch_id, custom_id), whose keys arrive in no order, ~1.7 µs; the lease-token index, an
entry for every queued row though only leased rows carry a token, ~0.3 µs.

- Nothing deletes batches, so the cascade never ran; ingest and settle only write rows of a
  batch they have just read.
- custom_ids are unique per batch by validation: `validate_file` rejects every repeat of an
  accepted id, across a resume too (`known_custom_ids` seeds it), and concurrent ingesters
  decide alike because each has seen every line before the ones it commits (see
  store/ingest.py). (batch_id, line_no) stays unique: it is what makes a replayed or
  concurrent ingest insert nothing twice.
- Every query on `lease_token` compares it to a value, which the partial index answers on
  both PostgreSQL and SQLite.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite's foreign keys have no name: batch mode finds them by this convention.
_NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
_LEASED = "lease_token IS NOT NULL"


def _fk_name(table: str) -> str:
    """The name of `table`'s foreign key to batches (0001 left it unnamed: PostgreSQL named it
    `{table}_batch_id_fkey`, SQLite not at all, and batch mode then goes by `_NAMING`)."""
    for fk in sa.inspect(op.get_bind()).get_foreign_keys(table):
        if fk["referred_table"] == "batches":
            return str(
                fk["name"]
                or _NAMING["fk"]
                % {
                    "table_name": table,
                    "column_0_name": "batch_id",
                    "referred_table_name": "batches",
                }
            )
    raise RuntimeError(f"{table} has no foreign key to batches")


def upgrade() -> None:
    with op.batch_alter_table("requests", naming_convention=_NAMING) as batch_op:
        batch_op.drop_constraint(_fk_name("requests"), type_="foreignkey")
        batch_op.drop_constraint("uq_requests_batch_custom_id", type_="unique")
        batch_op.drop_index("ix_requests_lease_token")
        batch_op.create_index(
            "ix_requests_lease_token",
            ["lease_token"],
            postgresql_where=sa.text(_LEASED),
            sqlite_where=sa.text(_LEASED),
        )
    with op.batch_alter_table("results", naming_convention=_NAMING) as batch_op:
        batch_op.drop_constraint(_fk_name("results"), type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("results") as batch_op:
        batch_op.create_foreign_key(
            "results_batch_id_fkey", "batches", ["batch_id"], ["id"], ondelete="CASCADE"
        )
    with op.batch_alter_table("requests") as batch_op:
        batch_op.drop_index("ix_requests_lease_token")
        batch_op.create_index("ix_requests_lease_token", ["lease_token"])
        batch_op.create_unique_constraint("uq_requests_batch_custom_id", ["batch_id", "custom_id"])
        batch_op.create_foreign_key(
            "requests_batch_id_fkey", "batches", ["batch_id"], ["id"], ondelete="CASCADE"
        )
