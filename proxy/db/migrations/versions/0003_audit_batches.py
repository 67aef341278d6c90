"""llama_audit_batches: exactly-once audit writes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

The audit writer records each batch's id in the transaction that COPYs its rows, so a batch
retried after an ambiguous failure or replayed from a spill file is written once.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "llama_audit_batches",
        sa.Column("batch_id", sa.Uuid, nullable=False),
        sa.Column(
            "written_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("row_count", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_llama_audit_batches")),
    )
    op.create_index("ix_llama_audit_batches_written_at", "llama_audit_batches", ["written_at"])


def downgrade() -> None:
    op.drop_table("llama_audit_batches")
