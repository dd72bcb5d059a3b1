"""Results say whether their threshold was calibrated (set for the product or line): a nullable `calibrated`
column; rows stored before it are NULL (unknown).

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("calibrated", sa.Boolean))


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_column("calibrated")
