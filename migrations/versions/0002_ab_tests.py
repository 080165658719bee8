"""A/B tests: the ``ab_tests`` table, ``pairs.ab_test_id`` and the ``ab`` pair kind.

The pair kind is a VARCHAR with a CHECK constraint (a portable enum): the constraint is
replaced to admit ``ab``. Batch mode rebuilds ``pairs`` on SQLite; PostgreSQL alters it in
place. Downgrading deletes the A/B pairs with their votes and assignments first (they would
violate the old constraint).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KINDS = ("within_version", "cross_version", "gold")
NEW_KINDS = (*OLD_KINDS, "ab")


def _kind_check(kinds: tuple[str, ...]) -> str:
    return "kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")"


def upgrade() -> None:
    op.create_table(
        "ab_tests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=False),
        sa.Column(
            "phase",
            sa.Enum("gate", "live", name="ab_phase", native_enum=False, create_constraint=True),
            nullable=False,
        ),
        sa.Column(
            "state",
            sa.Enum(
                "open",
                "promote",
                "reject",
                "inconclusive",
                "overridden",
                "rollback",
                "closed",
                name="ab_state",
                native_enum=False,
                create_constraint=True,
            ),
            nullable=False,
        ),
        sa.Column("policy", sa.String(length=16), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("wins", sa.Integer(), nullable=False),
        sa.Column("losses", sa.Integer(), nullable=False),
        sa.Column("ties", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["model_versions.id"], name=op.f("fk_ab_tests_parent_id_model_versions")
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
            name=op.f("fk_ab_tests_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ab_tests")),
        sa.UniqueConstraint("version_id", "phase", name=op.f("uq_ab_tests_version_id_phase")),
    )
    op.create_index(op.f("ix_ab_tests_version_id"), "ab_tests", ["version_id"], unique=False)
    with op.batch_alter_table("pairs") as batch_op:
        batch_op.add_column(sa.Column("ab_test_id", sa.Integer(), nullable=True))
        batch_op.create_index(op.f("ix_pairs_ab_test_id"), ["ab_test_id"], unique=False)
        batch_op.create_foreign_key(
            op.f("fk_pairs_ab_test_id_ab_tests"), "ab_tests", ["ab_test_id"], ["id"]
        )
        batch_op.drop_constraint(op.f("ck_pairs_pair_kind"), type_="check")
        batch_op.create_check_constraint(op.f("ck_pairs_pair_kind"), _kind_check(NEW_KINDS))


def downgrade() -> None:
    ab_pairs = "SELECT id FROM pairs WHERE kind = 'ab'"
    op.execute(f"DELETE FROM votes WHERE pair_id IN ({ab_pairs})")
    op.execute(f"DELETE FROM pair_assignments WHERE pair_id IN ({ab_pairs})")
    op.execute("DELETE FROM pairs WHERE kind = 'ab'")
    with op.batch_alter_table("pairs") as batch_op:
        batch_op.drop_constraint(op.f("ck_pairs_pair_kind"), type_="check")
        batch_op.create_check_constraint(op.f("ck_pairs_pair_kind"), _kind_check(OLD_KINDS))
        batch_op.drop_constraint(op.f("fk_pairs_ab_test_id_ab_tests"), type_="foreignkey")
        batch_op.drop_index(op.f("ix_pairs_ab_test_id"))
        batch_op.drop_column("ab_test_id")
    op.drop_index(op.f("ix_ab_tests_version_id"), table_name="ab_tests")
    op.drop_table("ab_tests")
