"""Lossless Pick-a-Pic round trip: ``images.external_uid`` and ``votes.external_ranking_id``.

An import keeps each image's uid and each vote's ``ranking_id`` (and its ``created_at``, in
the existing column), so an export gives them back as they went in.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 05:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch_op:
        batch_op.add_column(sa.Column("external_uid", sa.String(length=128), nullable=True))
    with op.batch_alter_table("votes") as batch_op:
        batch_op.add_column(sa.Column("external_ranking_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("votes") as batch_op:
        batch_op.drop_column("external_ranking_id")
    with op.batch_alter_table("images") as batch_op:
        batch_op.drop_column("external_uid")
