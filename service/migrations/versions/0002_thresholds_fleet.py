"""Thresholds and calibration records in the database (they were a JSON file), and the fleet: the desired model and
one heartbeat row per replica.

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "thresholds",
        sa.Column("product", sa.String(64), primary_key=True),
        sa.Column("line", sa.String(64), primary_key=True),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("score", sa.String(16), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("updated_by", sa.String(64)),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("extra", sa.JSON, nullable=False),
    )
    op.create_table(
        "calibrations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("product", sa.String(64), nullable=False),
        sa.Column("line", sa.String(64), nullable=False),
        sa.Column("score", sa.String(16), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("target_frr", sa.Float, nullable=False),
        sa.Column("n_images", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(64)),
        sa.Column("model_name", sa.String(64)),
        sa.Column("model_version", sa.String(64)),
        sa.Column("stored", sa.Boolean, nullable=False),
        sa.Column("details", sa.JSON, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_calibrations_product_id", "calibrations", ["product", "id"])
    op.create_table(
        "fleet_desired",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("model_name", sa.String(64)),
        sa.Column("model_version", sa.String(64)),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("set_at", sa.Float),
        sa.Column("set_by", sa.String(128)),
        sa.Column("candidate_name", sa.String(64)),
        sa.Column("candidate_version", sa.String(64)),
        sa.Column("candidate_at", sa.Float),
    )
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.String(128), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model_name", sa.String(64)),
        sa.Column("model_version", sa.String(64)),
        sa.Column("applied_generation", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("package_version", sa.String(32)),
    )


def downgrade() -> None:
    op.drop_table("replicas")
    op.drop_table("fleet_desired")
    op.drop_index("ix_calibrations_product_id", "calibrations")
    op.drop_table("calibrations")
    op.drop_table("thresholds")
