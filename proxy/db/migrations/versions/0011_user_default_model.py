"""users.default_model: each user's own default model

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01

`POST /setModel` stores the model a user's requests naming none get; NULL keeps the server's
default. A change notifies every proxy through the existing users trigger (migration 0002), so
cached keys pick it up at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("default_model", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("users", "default_model")
