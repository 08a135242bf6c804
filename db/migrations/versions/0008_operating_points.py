"""validation: the site's adopted operating points (issue 15)

``operating_points`` holds each threshold adopted with ``ctdx validate adopt``
and the local validation it rests on; ``analyses.operating_point_id`` names
the one an analysis was made at (NULL for existing rows: they used the
configured threshold).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ctdx.db.models.base import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "operating_points",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adopted_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("adopted_by", sa.String(length=128), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("model_uid", sa.String(length=64), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("choice", sa.String(length=32), nullable=False),
        sa.Column("target_sensitivity", sa.Float(), nullable=True),
        sa.Column("validated_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("n_studies", sa.Integer(), nullable=False),
        sa.Column("n_positive", sa.Integer(), nullable=False),
        sa.Column("n_negative", sa.Integer(), nullable=False),
        sa.Column("sensitivity", sa.Float(), nullable=False),
        sa.Column("sensitivity_low", sa.Float(), nullable=False),
        sa.Column("sensitivity_high", sa.Float(), nullable=False),
        sa.Column("specificity", sa.Float(), nullable=False),
        sa.Column("specificity_low", sa.Float(), nullable=False),
        sa.Column("specificity_high", sa.Float(), nullable=False),
        sa.Column("positive_rate", sa.Float(), nullable=False),
        sa.Column("auc", sa.Float(), nullable=True),
        sa.Column("source_dir", sa.Text(), nullable=True),
        sa.Column("truth_sha256", sa.String(length=64), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operating_points")),
    )
    with op.batch_alter_table("operating_points", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_operating_points_model_uid"), ["model_uid"],
                              unique=False)
    # A plain column, not a foreign key: on SQLite a constraint means recreating
    # ``analyses``, which its children (slice_results, exports) refuse while
    # foreign keys are enforced. Rows of operating_points are never deleted.
    op.add_column("analyses", sa.Column("operating_point_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("analyses", "operating_point_id")
    with op.batch_alter_table("operating_points", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_operating_points_model_uid"))
    op.drop_table("operating_points")
