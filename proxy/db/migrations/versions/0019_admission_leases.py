"""admission leases: a proxy admits a busy user's requests locally within a lease of places

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07

`llama_gate_admit` (0013) is one transaction per decision: a user sending requests one after
another costs a round trip to Postgres each (~0.4 ms here, a write under an advisory lock). The
lease functions decide the same sliding windows, and may also grant a few more places than the
requests waiting (`leased`), which the asking proxy then admits on its own, with no round trip,
until the lease ends (`lease_ends`: the proxy asks for at most 5 s, a twelfth of the window).

Never more than the limit, across every process: a leased place is a row of the window like an
admission (the requests decided in the call are admitted then, as before), stamped at the
lease's end, which is no earlier than any admission made in it. So
other processes count it from the moment it is granted, and it leaves the window no earlier than
the admission made in it would have. When the proxy asks again (its next lease, or once the lease
ended), it gives the lease back (`p_return_at`, `p_return_rows`): the lease's rows are removed and
one row is written for each admission made in it, at the time the proxy stamped it (the lease's
grant time plus the proxy's own elapsed time since it sent the asking call, so never earlier than
the admission was). A lone proxy therefore decides exactly as before: its refusals are made here,
after its own lease was given back. A proxy that dies with a lease leaves its rows stamped at the
lease's end: they hold the user's places for at most one window and the lease's length, never less.

What a lease can cost another process is bounded: places are leased only to a user all of whose
waiting requests were admitted, at most a quarter of the places still free after them, so while
one proxy holds unused places, another is refused only once three quarters of what was free
went; the proxy gives a lease back as soon as it is over (or with its next call), and a refusal
made while others hold leased places says to retry when the last of those leases ends.

Keys' and groups' windows (0018) have the same function, `llama_gate_lease_subject`. Both take
the same advisory locks as the admit functions, which stay for older proxies during an upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LEASE_FUNCTION = """
CREATE OR REPLACE FUNCTION {name}(
    p_holder {holder_type}, p_limit integer, p_window_ms integer, p_count integer,
    p_extra integer, p_ttl_ms integer,
    p_return_at timestamptz, p_return_rows integer, p_used_at timestamptz[],
    OUT granted integer, OUT leased integer, OUT free integer, OUT reset_ms integer,
    OUT retry_after_ms integer, OUT granted_at timestamptz, OUT lease_ends timestamptz
) LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz;
    v_window interval := p_window_ms * interval '1 millisecond';
    v_returned integer := 0;
    v_restamped integer := 0;
    v_expired integer;
    v_count integer;
    v_free timestamptz;
    v_leased timestamptz;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);  -- UNLOGGED tables only (0013)
    PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.rate.' || p_holder, 0));
    v_now := clock_timestamp();
    IF p_return_rows > 0 THEN
        -- The lease given back: its rows (all alike) go, each admission made in it comes back
        -- at its own time; never more rows than went (a lease given back twice changes nothing).
        DELETE FROM {admissions} WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {admissions}
            WHERE {column} = p_holder AND admitted_at = p_return_at LIMIT p_return_rows));
        GET DIAGNOSTICS v_returned = ROW_COUNT;
        INSERT INTO {admissions} ({column}, admitted_at)
            SELECT p_holder, least(u.at, p_return_at) FROM unnest(p_used_at) AS u(at)
            WHERE least(u.at, p_return_at) > v_now - v_window LIMIT v_returned;
        GET DIAGNOSTICS v_restamped = ROW_COUNT;
    END IF;
    DELETE FROM {admissions} WHERE {column} = p_holder AND admitted_at <= v_now - v_window;
    GET DIAGNOSTICS v_expired = ROW_COUNT;
    UPDATE {windows} SET admissions = admissions - v_expired - v_returned + v_restamped
        WHERE {column} = p_holder RETURNING admissions INTO v_count;
    IF NOT FOUND OR v_count < 0 THEN  -- first use, or a count gone astray: count once
        SELECT count(*) INTO v_count FROM {admissions} a WHERE a.{column} = p_holder;
        INSERT INTO {windows} ({column}, admissions) VALUES (p_holder, v_count)
            ON CONFLICT ({column}) DO UPDATE SET admissions = EXCLUDED.admissions;
    END IF;
    free := greatest(p_limit - v_count, 0);
    granted := least(p_count, free);
    leased := CASE WHEN granted = p_count
                   THEN greatest(least(p_extra, (free - granted) / 4), 0) ELSE 0 END;
    granted_at := v_now;
    -- The requests decided now are admitted now; leased places are stamped at the lease's end.
    IF leased > 0 THEN
        lease_ends := v_now + p_ttl_ms * interval '1 millisecond';
    END IF;
    IF granted + leased > 0 THEN
        INSERT INTO {admissions} ({column}, admitted_at)
            SELECT p_holder, CASE WHEN n <= granted THEN v_now ELSE lease_ends END
            FROM generate_series(1, granted + leased) AS n;
        UPDATE {windows} SET admissions = admissions + granted + leased
            WHERE {column} = p_holder;
    END IF;
    IF granted = p_count THEN
        SELECT min(a.admitted_at) INTO v_free FROM {admissions} a WHERE a.{column} = p_holder;
    ELSE
        -- Admission reopens when the (count - limit + 1)th oldest leaves the window (0013).
        SELECT a.admitted_at INTO v_free FROM {admissions} a WHERE a.{column} = p_holder
            ORDER BY a.admitted_at OFFSET v_count + granted - p_limit LIMIT 1;
    END IF;
    reset_ms := greatest(1, ceil(extract(epoch FROM
        coalesce(v_free, v_now) + v_window - v_now) * 1000))::integer;
    retry_after_ms := CASE WHEN granted = p_count THEN 0 ELSE reset_ms END;
    IF granted < p_count THEN
        -- Places other processes hold on lease (rows stamped in the future) may come back
        -- unused when their leases end: worth asking again then, not only once one expires.
        SELECT max(a.admitted_at) INTO v_leased FROM {admissions} a
            WHERE a.{column} = p_holder AND a.admitted_at > v_now;
        IF v_leased IS NOT NULL THEN
            retry_after_ms := least(retry_after_ms, ceil(extract(epoch FROM
                v_leased - v_now) * 1000)::integer + GIVE_BACK_SLACK_MS);
        END IF;
    END IF;
END
$$
"""

# Users' windows, and keys' and groups' (0018): the same function on their own tables.
_HOLDERS = (
    ("llama_gate_lease", "bigint", "rate_admissions", "rate_windows", "user_id"),
    ("llama_gate_lease_subject", "text", "rate_subject_admissions", "rate_subject_windows",
     "subject"),
)  # fmt: skip
# A lease's process gives it back within this of its end (its sweeper's slack, and a call).
GIVE_BACK_SLACK_MS = 200
LEASE_FUNCTIONS = {
    name: _LEASE_FUNCTION.replace("GIVE_BACK_SLACK_MS", str(GIVE_BACK_SLACK_MS)).format(
        name=name, holder_type=holder_type, admissions=admissions, windows=windows, column=column
    )
    for name, holder_type, admissions, windows, column in _HOLDERS
}
_ARGUMENTS = "integer, integer, integer, integer, integer, timestamptz, integer, timestamptz[]"


def upgrade() -> None:
    for function in LEASE_FUNCTIONS.values():
        op.execute(function)


def downgrade() -> None:
    op.execute(f"DROP FUNCTION llama_gate_lease_subject(text, {_ARGUMENTS})")
    op.execute(f"DROP FUNCTION llama_gate_lease(bigint, {_ARGUMENTS})")
