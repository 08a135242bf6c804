"""operations: worker heartbeats and reconciliation (issue 14)

Placeholder: no schema change yet (the issue's work fills it in or leaves it a no-op).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
