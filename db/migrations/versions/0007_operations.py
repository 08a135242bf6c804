"""operations: service heartbeats for ``ctdx status`` (issue 14)

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ctdx.db.models.base import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "service_heartbeats",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=192), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("seen_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_heartbeats")),
        sa.UniqueConstraint("name", name=op.f("uq_service_heartbeats_name")),
    )
    with op.batch_alter_table("service_heartbeats", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_service_heartbeats_kind"), ["kind"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_service_heartbeats_seen_at"), ["seen_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("service_heartbeats", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_service_heartbeats_seen_at"))
        batch_op.drop_index(batch_op.f("ix_service_heartbeats_kind"))
    op.drop_table("service_heartbeats")
