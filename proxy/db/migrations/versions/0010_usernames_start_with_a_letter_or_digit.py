"""usernames start with a letter or digit

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01

`--username --help`, `-` and `...` were valid usernames: names that read as options or as
nothing on a command line. The check on `users.username` now also asks for a letter or digit
first. A database that already holds such a name is not changed behind the operator's back: the
upgrade stops and names them, with the SQL to rename or delete each.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_PATTERN = "^[a-z0-9._-]{1,64}$"
NEW_PATTERN = "^[a-z0-9][a-z0-9._-]{0,63}$"


def _replace_check(pattern: str) -> None:
    op.drop_constraint(op.f("ck_users_username_format"), "users", type_="check")
    op.create_check_constraint(op.f("ck_users_username_format"), "users", f"username ~ '{pattern}'")


def upgrade() -> None:
    offending = (
        op.get_bind()
        .execute(
            sa.text("SELECT username FROM users WHERE username !~ :pattern ORDER BY username"),
            {"pattern": NEW_PATTERN},
        )
        .scalars()
        .all()
    )
    if offending:
        names = ", ".join(repr(name) for name in offending[:10])
        first = offending[0].replace("'", "''")
        raise RuntimeError(
            f"{len(offending)} username(s) do not start with a letter or digit: {names}. Rename "
            f"or delete each in psql, e.g. UPDATE users SET username = 'new-name' WHERE "
            f"username = '{first}'; (or DELETE FROM users WHERE username = '{first}';), then "
            "run `llama-gate init-db` again"
        )
    _replace_check(NEW_PATTERN)


def downgrade() -> None:
    _replace_check(OLD_PATTERN)
