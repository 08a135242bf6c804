"""results: analyses and per-slice results

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ctdx.db.models.base import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "analyses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_version_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("model_uid", sa.String(length=64), nullable=False),
        sa.Column("manifestation_model_uid", sa.String(length=64), nullable=True),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.Column("device", sa.String(length=128), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("series_selection", sa.Text(), nullable=True),
        sa.Column("slices_total", sa.Integer(), nullable=True),
        sa.Column("slices_analysed", sa.Integer(), nullable=True),
        sa.Column("slices_skipped", sa.Integer(), nullable=True),
        sa.Column("fraction_covid19", sa.Float(), nullable=True),
        sa.Column("fraction_other_pneumonia", sa.Float(), nullable=True),
        sa.Column("fraction_normal", sa.Float(), nullable=True),
        sa.Column("decision", sa.String(length=32), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("manifestation_counts", sa.JSON(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_version_id"],
            ["study_versions.id"],
            name=op.f("fk_analyses_study_version_id_study_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analyses")),
        sa.UniqueConstraint(
            "study_version_id", "model_uid", name=op.f("uq_analyses_study_version_id")
        ),
    )
    with op.batch_alter_table("analyses", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_analyses_decision"), ["decision"], unique=False)
        batch_op.create_index(batch_op.f("ix_analyses_finished_at"), ["finished_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_analyses_state"), ["state"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_analyses_study_version_id"), ["study_version_id"], unique=False
        )

    op.create_table(
        "slice_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("analysis_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("slice_index", sa.Integer(), nullable=False),
        sa.Column("position_z", sa.Float(), nullable=True),
        sa.Column("lung_area_mm2", sa.Float(), nullable=True),
        sa.Column("lung_fraction", sa.Float(), nullable=False),
        sa.Column("skipped", sa.Boolean(), nullable=False),
        sa.Column("p_covid19", sa.Float(), nullable=True),
        sa.Column("p_other_pneumonia", sa.Float(), nullable=True),
        sa.Column("p_normal", sa.Float(), nullable=True),
        sa.Column("predicted_class", sa.String(length=32), nullable=True),
        sa.Column("p_ground_glass_opacity", sa.Float(), nullable=True),
        sa.Column("p_consolidation", sa.Float(), nullable=True),
        sa.Column("p_fibrotic_streaks", sa.Float(), nullable=True),
        sa.Column("manifestation", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["analysis_id"], ["analyses.id"], name=op.f("fk_slice_results_analysis_id_analyses")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_slice_results")),
    )
    with op.batch_alter_table("slice_results", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_slice_results_analysis_id"), ["analysis_id"], unique=False
        )



def downgrade() -> None:
    with op.batch_alter_table("slice_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_slice_results_analysis_id"))

    op.drop_table("slice_results")
    with op.batch_alter_table("analyses", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_analyses_study_version_id"))
        batch_op.drop_index(batch_op.f("ix_analyses_state"))
        batch_op.drop_index(batch_op.f("ix_analyses_finished_at"))
        batch_op.drop_index(batch_op.f("ix_analyses_decision"))

    op.drop_table("analyses")
