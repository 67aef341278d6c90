"""llama_requests.end_user: the end user a client names on its own behalf

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

OpenAI's `user` field and Anthropic's `metadata.user_id` let an application that shares one key
among its own users say whose request this is; it is recorded beside the key's user.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("llama_requests", sa.Column("end_user", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("llama_requests", "end_user")
