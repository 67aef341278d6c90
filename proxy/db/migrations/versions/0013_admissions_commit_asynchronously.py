"""llama_gate_admit commits without waiting for the disk

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06

A rate-limit decision is one transaction per request (a group of them when one user's requests
arrive together). Everything it writes is in `rate_admissions` and `rate_windows`, which are
UNLOGGED: a crash of Postgres empties them whatever a commit waited for, so waiting for the WAL
flush of its commit record bought nothing but the wait (0.52 against 0.36 ms per decision on this
machine's default-durability Postgres; 3.6 ms on slower disks). The function now sets
`synchronous_commit` off for its own transaction. Other processes see a decision as soon as it
commits, as before, so limits stay exact across them; what a crash of Postgres forgets is at most
one window of admissions, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADMIT_FUNCTION = """
CREATE OR REPLACE FUNCTION llama_gate_admit(
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
    -- The commit need not wait for the WAL to reach the disk: everything this writes is in
    -- UNLOGGED tables, which a crash of Postgres empties whatever the commit waited for.
    PERFORM set_config('synchronous_commit', 'off', true);
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

ADMIT_FUNCTION_0002 = """
CREATE OR REPLACE FUNCTION llama_gate_admit(
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
    op.execute(ADMIT_FUNCTION)


def downgrade() -> None:
    op.execute(ADMIT_FUNCTION_0002)
