"""stored Responses API answers: llama_responses

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06

`POST /v1/responses` with `store` (OpenAI's default) keeps the response for
LLAMA_PROXY_RESPONSES_RETENTION days, for `previous_response_id`, `GET`/`DELETE
/v1/responses/{id}` and its input items, from any proxy process. Each row holds its own turn of
the conversation; a user's deletion takes their responses with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "llama_responses",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("previous_id", sa.Text(), nullable=True),
        sa.Column("input_items", JSONB(), nullable=False),
        sa.Column("messages", JSONB(), nullable=False),
        sa.Column("response", JSONB(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_llama_responses_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_llama_responses")),
    )  # fmt: skip
    op.create_index(op.f("ix_llama_responses_user_id"), "llama_responses", ["user_id"])
    op.create_index(op.f("ix_llama_responses_expires_at"), "llama_responses", ["expires_at"])


def downgrade() -> None:
    op.drop_table("llama_responses")
