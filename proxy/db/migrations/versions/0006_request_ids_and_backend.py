"""llama_requests: our own request id apart from the client's, and the backend that served it

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

`request_id` was the client's X-Request-Id when it sent one, so a client could give many requests
the same id; the token-quota ledger matched rows by it. From now on `request_id` is always the
proxy's own (unique) id and `client_request_id` keeps what the client sent. `backend` names the
backend that served the request.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("llama_requests", sa.Column("client_request_id", sa.Text, nullable=True))
    op.add_column("llama_requests", sa.Column("backend", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("llama_requests", "backend")
    op.drop_column("llama_requests", "client_request_id")
