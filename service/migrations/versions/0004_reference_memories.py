"""Few-shot reference memories (WinCLIP+) in the database, one per product and per product line, next to the
thresholds fitted with them (they were files next to the thresholds file, which a fleet's replicas do not share).

Revision ID: 0004
Revises: 0003
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reference_memories",
        sa.Column("product", sa.String(64), primary_key=True),
        sa.Column("line", sa.String(64), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("header", sa.JSON, nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("stamp", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reference_memories")
