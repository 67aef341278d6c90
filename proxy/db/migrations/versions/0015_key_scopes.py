"""scoped keys: api_keys.models and api_keys.apis

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07

A key may be limited to some models (exact names or globs such as `qwen*`) and to some APIs
(`chat`, `embeddings`, `models`, ...): NULL, what every existing key gets, means all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("models", ARRAY(sa.Text()), nullable=True))
    op.add_column("api_keys", sa.Column("apis", ARRAY(sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column("api_keys", "apis")
    op.drop_column("api_keys", "models")
