"""results: slice results identify their frame (Enhanced CT), one row per slice index

An Enhanced CT instance holds many slices, so a slice result is identified by
its SOP Instance UID and ``frame_number`` (1-based; NULL for single-frame
instances). Nothing was unique on ``sop_instance_uid`` in ``slice_results``;
what is unique is the slice's place in the analysed series, now enforced:
``(analysis_id, slice_index)``. Existing rows keep NULL (they are single-frame
CT: the worker could not analyse multi-frame instances before this revision).

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
    with op.batch_alter_table("slice_results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("frame_number", sa.Integer(), nullable=True))
        batch_op.create_unique_constraint(
            batch_op.f("uq_slice_results_analysis_id"), ["analysis_id", "slice_index"]
        )


def downgrade() -> None:
    with op.batch_alter_table("slice_results", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_slice_results_analysis_id"), type_="unique")
        batch_op.drop_column("frame_number")
