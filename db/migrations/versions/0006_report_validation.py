"""reports: validation outcome of report objects (issue 13)

Placeholder: no schema change yet (the issue's work fills it in or leaves it a no-op).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
