"""the proxy's shared state: auth invalidation notices and sliding-window rate limits

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

- Triggers on `api_keys` and `users` NOTIFY `llama_gate_auth` when a key is revoked, expires,
  or is deleted, or a user changes or is deleted, so every proxy drops its cached verdict within
  a second. Writing `last_used_at` or a re-hashed `secret_hash` notifies nobody.
- `rate_admissions` (UNLOGGED: it is rebuilt within one rate window after a crash, so WAL would
  only cost time) holds each admitted request; `llama_gate_admit` decides one request under a
  per-user advisory lock, so several proxy processes share one exact sliding window.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUTH_CHANNEL = "llama_gate_auth"

NOTIFY_FUNCTION = f"""
CREATE FUNCTION llama_gate_notify_auth() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'api_keys' THEN
        PERFORM pg_notify('{AUTH_CHANNEL}', 'key:' || OLD.key_id);
    ELSE
        PERFORM pg_notify('{AUTH_CHANNEL}', 'user:' || OLD.id);
    END IF;
    RETURN NULL;
END
$$
"""

TRIGGERS = (
    """CREATE TRIGGER api_keys_notify_auth_update
       AFTER UPDATE OF key_id, user_id, expires_at, revoked_at ON api_keys FOR EACH ROW
       WHEN (OLD.key_id IS DISTINCT FROM NEW.key_id OR OLD.user_id IS DISTINCT FROM NEW.user_id
             OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
             OR OLD.revoked_at IS DISTINCT FROM NEW.revoked_at)
       EXECUTE FUNCTION llama_gate_notify_auth()""",
    """CREATE TRIGGER api_keys_notify_auth_delete
       AFTER DELETE ON api_keys FOR EACH ROW EXECUTE FUNCTION llama_gate_notify_auth()""",
    """CREATE TRIGGER users_notify_auth_update
       AFTER UPDATE ON users FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*)
       EXECUTE FUNCTION llama_gate_notify_auth()""",
    """CREATE TRIGGER users_notify_auth_delete
       AFTER DELETE ON users FOR EACH ROW EXECUTE FUNCTION llama_gate_notify_auth()""",
)

# One round trip per request. clock_timestamp() is read after the lock, so one user's admissions
# are ordered in time however the callers' transactions interleave.
ADMIT_FUNCTION = """
CREATE FUNCTION llama_gate_admit(
    p_user_id bigint, p_limit integer, p_window_ms integer, p_count integer,
    OUT granted integer, OUT remaining integer, OUT reset_ms integer, OUT retry_after_ms integer
) LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz;
    v_window interval := p_window_ms * interval '1 millisecond';
    v_expired integer;
    v_count integer;
    v_free timestamptz;
BEGIN
    -- p_count requests of one user arrived together (one proxy batches what waits while its
    -- previous call runs); the first `granted` of them are admitted.
    PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.rate.' || p_user_id, 0));
    v_now := clock_timestamp();
    -- rate_windows keeps each user's count, so a decision costs O(log n) however high the
    -- limit: only the admissions leaving the window are touched, each once.
    DELETE FROM rate_admissions WHERE user_id = p_user_id AND admitted_at <= v_now - v_window;
    GET DIAGNOSTICS v_expired = ROW_COUNT;
    UPDATE rate_windows SET admissions = admissions - v_expired WHERE user_id = p_user_id
        RETURNING admissions INTO v_count;
    IF NOT FOUND OR v_count < 0 THEN  -- first use, or a count gone astray: count once
        SELECT count(*) INTO v_count FROM rate_admissions a WHERE a.user_id = p_user_id;
        INSERT INTO rate_windows (user_id, admissions) VALUES (p_user_id, v_count)
            ON CONFLICT (user_id) DO UPDATE SET admissions = EXCLUDED.admissions;
    END IF;
    granted := least(p_count, greatest(p_limit - v_count, 0));
    IF granted > 0 THEN
        INSERT INTO rate_admissions (user_id, admitted_at)
            SELECT p_user_id, v_now FROM generate_series(1, granted);
        UPDATE rate_windows SET admissions = admissions + granted WHERE user_id = p_user_id;
    END IF;
    remaining := greatest(p_limit - v_count - granted, 0);
    IF granted = p_count THEN
        SELECT min(a.admitted_at) INTO v_free FROM rate_admissions a WHERE a.user_id = p_user_id;
    ELSE
        -- Admission reopens when the (count - limit + 1)th oldest leaves the window; that is
        -- the oldest one unless the limit was lowered while the window was full.
        SELECT a.admitted_at INTO v_free FROM rate_admissions a WHERE a.user_id = p_user_id
            ORDER BY a.admitted_at OFFSET v_count + granted - p_limit LIMIT 1;
    END IF;
    reset_ms := greatest(1, ceil(extract(epoch FROM v_free + v_window - v_now) * 1000))::integer;
    retry_after_ms := CASE WHEN granted = p_count THEN 0 ELSE reset_ms END;
END
$$
"""


def upgrade() -> None:
    op.execute(NOTIFY_FUNCTION)
    for trigger in TRIGGERS:
        op.execute(trigger)
    op.create_table(
        "rate_admissions",
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("admitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_rate_admissions_user_id_users"),
            ondelete="CASCADE",
        ),
        prefixes=["UNLOGGED"],
    )
    op.create_index(
        "ix_rate_admissions_user_id_admitted_at", "rate_admissions", ["user_id", "admitted_at"]
    )
    op.create_table(
        "rate_windows",
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("admissions", sa.Integer, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_rate_windows_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_rate_windows")),
        prefixes=["UNLOGGED"],
    )
    op.execute(ADMIT_FUNCTION)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS llama_gate_admit(bigint, integer, integer, integer)")
    op.drop_table("rate_windows")
    op.drop_table("rate_admissions")
    op.execute("DROP TRIGGER IF EXISTS users_notify_auth_delete ON users")
    op.execute("DROP TRIGGER IF EXISTS users_notify_auth_update ON users")
    op.execute("DROP TRIGGER IF EXISTS api_keys_notify_auth_delete ON api_keys")
    op.execute("DROP TRIGGER IF EXISTS api_keys_notify_auth_update ON api_keys")
    op.execute("DROP FUNCTION IF EXISTS llama_gate_notify_auth()")
