"""Shadow-ban: ``users.status`` may be ``shadow_banned``.

A shadow-banned annotator keeps voting, unaware; their votes never train or count (every
training, A/B, ranking and agreement query takes active annotators only). The status column
widens to 13 characters and its CHECK constraint gains the value.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 05:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = sa.Enum("active", "banned", name="user_status", native_enum=False, create_constraint=True)
_NEW = sa.Enum(
    "active",
    "banned",
    "shadow_banned",
    name="user_status",
    native_enum=False,
    create_constraint=True,
)


def upgrade() -> None:
    with op.batch_alter_table("users") as batch_op:
        batch_op.alter_column("status", existing_type=_OLD, type_=_NEW, existing_nullable=False)


def downgrade() -> None:
    # Shadow-banned annotators become banned: the older schema has no other way to keep their
    # votes out of training.
    op.execute("UPDATE users SET status = 'banned' WHERE status = 'shadow_banned'")
    with op.batch_alter_table("users") as batch_op:
        batch_op.alter_column("status", existing_type=_NEW, type_=_OLD, existing_nullable=False)
