"""retention: pruned spool records, alert outbox, self-test studies (issue 18)

``spool_prunes``: one row per study version whose source instances are deleted
from the spool (the row is inserted first, as the claim); ``report_prunes``: one
per report object deleted after ``CTDX_REPORT_RETENTION_DAYS``. ``alerts``: webhook
outbox. ``selftest_studies``: studies sent by ``ctdx selftest`` and where their
reports go. New tables only: existing rows are untouched.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ctdx.db.models.base import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spool_prunes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_version_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=False),
        sa.Column("claimed_at", UTCDateTime(), nullable=False),
        sa.Column("pruned_at", UTCDateTime(), nullable=True),
        sa.Column("files_removed", sa.Integer(), nullable=False),
        sa.Column("bytes_freed", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_version_id"], ["study_versions.id"],
            name=op.f("fk_spool_prunes_study_version_id_study_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spool_prunes")),
        sa.UniqueConstraint("study_version_id", name=op.f("uq_spool_prunes_study_version_id")),
    )
    op.create_index(op.f("ix_spool_prunes_pruned_at"), "spool_prunes", ["pruned_at"])
    op.create_table(
        "report_prunes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("pruned_at", UTCDateTime(), nullable=False),
        sa.Column("bytes_freed", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_report_prunes")),
        sa.UniqueConstraint("path", name=op.f("uq_report_prunes_path")),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("dedup_key", sa.String(length=128), nullable=False),
        sa.Column("url", sa.String(length=512), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("dedup_key", "url", name=op.f("uq_alerts_dedup_key")),
    )
    op.create_index(op.f("ix_alerts_event"), "alerts", ["event"])
    op.create_index(op.f("ix_alerts_state"), "alerts", ["state"])
    op.create_index(op.f("ix_alerts_next_attempt_at"), "alerts", ["next_attempt_at"])
    op.create_table(
        "selftest_studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_selftest_studies")),
        sa.UniqueConstraint(
            "study_instance_uid", name=op.f("uq_selftest_studies_study_instance_uid")
        ),
    )


def downgrade() -> None:
    op.drop_table("selftest_studies")
    op.drop_index(op.f("ix_alerts_next_attempt_at"), table_name="alerts")
    op.drop_index(op.f("ix_alerts_state"), table_name="alerts")
    op.drop_index(op.f("ix_alerts_event"), table_name="alerts")
    op.drop_table("alerts")
    op.drop_table("report_prunes")
    op.drop_index(op.f("ix_spool_prunes_pruned_at"), table_name="spool_prunes")
    op.drop_table("spool_prunes")
