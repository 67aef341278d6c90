"""llama_requests.user_id without a foreign key

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22

An audit row is written about a second after its request ends; if the user was deleted in the
meantime (their stream still running), the foreign key refused the whole batch it was in. The
rows keep `username`, which is what the audit trail needs once an account is gone.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("fk_llama_requests_user_id_users", "llama_requests", type_="foreignkey")


def downgrade() -> None:
    op.execute(
        "UPDATE llama_requests SET user_id = NULL WHERE user_id NOT IN (SELECT id FROM users)"
    )
    op.create_foreign_key(
        "fk_llama_requests_user_id_users",
        "llama_requests",
        "users",
        ["user_id"],
        ["id"],
        ondelete="SET NULL",
    )
