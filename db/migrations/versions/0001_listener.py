"""listener: studies, series, instances, leases, mpps, outbox

Revision ID: 0001
Revises: None
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ctdx.db.models.base import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "performed_procedure_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("referenced_sop_instance_uids", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("applied_at", UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_performed_procedure_steps")),
        sa.UniqueConstraint(
            "sop_instance_uid", name=op.f("uq_performed_procedure_steps_sop_instance_uid")
        ),
    )
    with op.batch_alter_table("performed_procedure_steps", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_performed_procedure_steps_study_instance_uid"),
            ["study_instance_uid"],
            unique=False,
        )

    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("patient_name", sa.String(length=324), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("study_description", sa.String(length=64), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_studies_study_instance_uid")),
    )
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(length=64), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_series_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("series_instance_uid", name=op.f("uq_series_series_instance_uid")),
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_series_study_id"), ["study_id"], unique=False)

    op.create_table(
        "study_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=True),
        sa.Column("first_received_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("completed_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("completion_reason", sa.String(length=16), nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_study_versions_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_versions")),
        sa.UniqueConstraint("study_id", "version", name=op.f("uq_study_versions_study_id")),
    )
    with op.batch_alter_table("study_versions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_study_versions_last_received_at"), ["last_received_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_study_versions_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_study_versions_study_id"), ["study_id"], unique=False)

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("study_version_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=True),
        sa.Column("received_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name=op.f("fk_instances_series_id_series")
        ),
        sa.ForeignKeyConstraint(
            ["study_version_id"],
            ["study_versions.id"],
            name=op.f("fk_instances_study_version_id_study_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instances_series_id"), ["series_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_instances_study_version_id"), ["study_version_id"], unique=False
        )

    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_version_id", sa.Integer(), nullable=False),
        sa.Column("task_name", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("dispatched_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_version_id"],
            ["study_versions.id"],
            name=op.f("fk_outbox_study_version_id_study_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("study_version_id", name=op.f("uq_outbox_study_version_id")),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_outbox_dispatched_at"), ["dispatched_at"], unique=False
        )

    op.create_table(
        "receiving_leases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_version_id", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_version_id"],
            ["study_versions.id"],
            name=op.f("fk_receiving_leases_study_version_id_study_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_receiving_leases")),
        sa.UniqueConstraint(
            "study_version_id", "holder", name=op.f("uq_receiving_leases_study_version_id")
        ),
    )
    with op.batch_alter_table("receiving_leases", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_receiving_leases_study_version_id"), ["study_version_id"], unique=False
        )



def downgrade() -> None:
    with op.batch_alter_table("receiving_leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_receiving_leases_study_version_id"))

    op.drop_table("receiving_leases")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_dispatched_at"))

    op.drop_table("outbox")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_study_version_id"))
        batch_op.drop_index(batch_op.f("ix_instances_series_id"))

    op.drop_table("instances")
    with op.batch_alter_table("study_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_versions_study_id"))
        batch_op.drop_index(batch_op.f("ix_study_versions_state"))
        batch_op.drop_index(batch_op.f("ix_study_versions_last_received_at"))

    op.drop_table("study_versions")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_study_id"))

    op.drop_table("series")
    op.drop_table("studies")
    with op.batch_alter_table("performed_procedure_steps", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_performed_procedure_steps_study_instance_uid"))

    op.drop_table("performed_procedure_steps")
