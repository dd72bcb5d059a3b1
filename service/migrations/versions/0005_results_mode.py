"""Results say how they were scored: `mode` ('zero_shot' or 'few_shot') and `shots` (reference images in the memory
used, 0 in zero-shot mode), so a dashboard or an audit can tell a verdict made against a product's reference memory
from a text-only one after the fact. Rows stored before are NULL (unknown).

Revision ID: 0005
Revises: 0004
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("mode", sa.String(16)))
        batch.add_column(sa.Column("shots", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_column("shots")
        batch.drop_column("mode")
