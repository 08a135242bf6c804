"""reports: why a report object of an analysis was not sent (issue 13)

Every SR, SC and KO is checked before it enters the export outbox
(``worker/report/validation.py``); an object that fails is not sent, and
``analyses.report_problems`` says which and why, one line per object. NULL:
every configured object passed (or none was built yet).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN (SQLite has it): a batch copy would drop ``analyses``, which
    # slice_results and exports reference
    op.add_column("analyses", sa.Column("report_problems", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("analyses", "report_problems")
