"""per-user concurrency caps, max_tokens caps and token quotas; quota lookups by user id

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

- `users` gains four nullable overrides: `max_concurrent` (requests in flight or queued) and
  `max_tokens` (the cap on one request) fall back to the proxy's settings when NULL;
  `tokens_per_day` and `tokens_per_minute` are token quotas, and NULL means none.
- `llama_requests (user_id, created_at)` with the token counts included: the proxy sums a user's
  tokens for today and the last minute from it, often as an index-only scan. Building it locks
  out audit inserts for as long as it takes; the proxy's audit writer holds rows in memory
  meanwhile, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("max_concurrent", "max_tokens", "tokens_per_day", "tokens_per_minute")


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("users", sa.Column(column, sa.Integer, nullable=True))
        op.create_check_constraint(
            op.f(f"ck_users_{column}_positive"), "users", f"{column} IS NULL OR {column} > 0"
        )
    op.create_index(
        "ix_llama_requests_user_id_created_at",
        "llama_requests",
        ["user_id", "created_at"],
        postgresql_include=["prompt_tokens", "completion_tokens"],
    )


def downgrade() -> None:
    op.drop_index("ix_llama_requests_user_id_created_at", table_name="llama_requests")
    for column in reversed(COLUMNS):
        op.drop_constraint(op.f(f"ck_users_{column}_positive"), "users", type_="check")
        op.drop_column("users", column)
