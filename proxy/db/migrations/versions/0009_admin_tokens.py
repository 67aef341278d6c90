"""admin_tokens: who may sign in to the dashboard

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

Admins sign in to the web dashboard with a token made by `llama-gate create-admin-token`. Like an
API key, only its public id and an argon2id hash of its secret are stored. The dashboard's
queries need no new index: its per-day figures read `ix_llama_requests_day_username` and its
newest-first request pages `ix_llama_requests_created_at` / `ix_llama_requests_username_created_at`
(tests/test_dashboard_queries.py checks the plans at a million rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "admin_tokens",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("token_id", sa.Text, nullable=False),
        sa.Column("secret_hash", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_tokens")),
        sa.UniqueConstraint("token_id", name=op.f("uq_admin_tokens_token_id")),
    )


def downgrade() -> None:
    op.drop_table("admin_tokens")
