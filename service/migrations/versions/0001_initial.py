"""The first release's schema (main at 7657705): results and heatmaps, as `metadata.create_all` made them.

A database that release created has these tables but no `alembic_version`: `service.db.migrate` stamps it at this
revision and upgrades it from here.

Revision ID: 0001
Revises:
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("line", sa.String(64)),
        sa.Column("product", sa.String(64)),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("score_name", sa.String(16), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("threshold_source", sa.String(16), nullable=False),
        sa.Column("scores", sa.JSON, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("object_name", sa.String(64)),
        sa.Column("filename", sa.String(255)),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_results_created_at", "results", ["created_at"])
    op.create_index("ix_results_product_id", "results", ["product", "id"])
    op.create_index("ix_results_line_id", "results", ["line", "id"])
    op.create_table(
        "heatmaps",
        sa.Column("result_id", sa.Integer, sa.ForeignKey("results.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("png", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("heatmaps")
    op.drop_table("results")
