"""allocations: an index on released_at, for the scheduling pass's fair share

The pass reads the allocations that ended since its last full sum (fairshare.usage);
without this index that is a scan of the whole history, every pass.

Revision ID: 0004_allocations_released
Revises: 0003_scheduling
Create Date: 2026-12-10
"""

from __future__ import annotations

from alembic import op

revision = "0004_allocations_released"
down_revision = "0003_scheduling"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_allocations_released", "allocations", ["released_at"])


def downgrade() -> None:
    op.drop_index("ix_allocations_released", table_name="allocations")
