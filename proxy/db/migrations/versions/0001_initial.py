"""users, api_keys, llama_requests and the llama_usage_daily view

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies: later changes to proxy.db.schema must not rewrite what this revision did.
USAGE_DAY = "((created_at AT TIME ZONE 'UTC')::date)"
USAGE_DAILY_VIEW = f"""
CREATE VIEW llama_usage_daily AS
SELECT {USAGE_DAY} AS day,
       username,
       count(*) AS requests,
       count(*) FILTER (WHERE status_code >= 400) AS errors,
       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens,
       coalesce(sum(request_bytes), 0) AS bytes_in,
       coalesce(sum(response_bytes), 0) AS bytes_out,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1) AS p50_ms,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1) AS p95_ms
FROM llama_requests
GROUP BY 1, 2
"""


def _created_at() -> sa.Column[object]:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    )


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("username", sa.Text, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.text("true")),
        _created_at(),
        sa.Column("rate_limit", sa.Integer, nullable=True),
        sa.Column("rate_window_seconds", sa.Integer, nullable=True),
        sa.CheckConstraint(
            "username ~ '^[a-z0-9._-]{1,64}$'", name=op.f("ck_users_username_format")
        ),
        sa.CheckConstraint(
            "rate_limit IS NULL OR rate_limit > 0", name=op.f("ck_users_rate_limit_positive")
        ),
        sa.CheckConstraint(
            "rate_window_seconds IS NULL OR rate_window_seconds > 0",
            name=op.f("ck_users_rate_window_positive"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("secret_hash", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=True),
        _created_at(),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_keys_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_id", name=op.f("uq_api_keys_key_id")),
    )
    op.create_index(op.f("ix_api_keys_user_id"), "api_keys", ["user_id"])
    op.create_table(
        "llama_requests",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("request_id", sa.Text, nullable=True),
        _created_at(),
        sa.Column("user_id", sa.BigInteger, nullable=True),
        sa.Column("username", sa.Text, nullable=True),
        sa.Column("key_id", sa.Text, nullable=True),
        sa.Column("method", sa.Text, nullable=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=True),
        sa.Column("stream", sa.Boolean, nullable=True),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("ttfb_ms", sa.Float, nullable=True),
        sa.Column("queue_ms", sa.Float, nullable=True),
        sa.Column("request_bytes", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("response_bytes", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("prompt_tokens", sa.Integer, nullable=True),
        sa.Column("completion_tokens", sa.Integer, nullable=True),
        sa.Column("client_addr", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_llama_requests_user_id_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_llama_requests")),
    )
    op.create_index("ix_llama_requests_created_at", "llama_requests", ["created_at"])
    op.create_index(
        "ix_llama_requests_username_created_at", "llama_requests", ["username", "created_at"]
    )
    op.create_index(
        "ix_llama_requests_day_username", "llama_requests", [sa.text(USAGE_DAY), "username"]
    )
    op.execute(USAGE_DAILY_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS llama_usage_daily")
    op.drop_table("llama_requests")
    op.drop_table("api_keys")
    op.drop_table("users")
