"""llama_requests.cached_tokens: the prompt tokens the backend's prompt cache served

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

OpenAI's `usage.prompt_tokens_details.cached_tokens` as the backend reported it: of
`prompt_tokens`, those it did not have to read again because it kept the conversation's state.
NULL for rows before this revision and for answers that report no such figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("llama_requests", sa.Column("cached_tokens", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("llama_requests", "cached_tokens")
