"""backend slots shared by proxy processes: leases, waiting requests, users' turns

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07

When more than one proxy process serves the same backends (`llama-gate serve --workers N`, or
proxies on several hosts), a request runs only while its process holds a lease on one of its
backend's slots (`llama_slot_leases`, renewed while it runs, so a killed process's slots come back
once its leases expire); the requests waiting for one are rows of `llama_slot_waiters`, and a freed
slot goes to the waiting user served least recently (`llama_slot_turns`), whichever process that
user's request waits in. `llama_gate_slot_grant` makes every grant, one at a time (an advisory
lock), and NOTIFYs the process owning the request on `llama_gate_slots`.

All four tables are UNLOGGED and the functions commit without waiting for the disk: what they hold
lives as long as the requests do, and a crash of Postgres, which empties them, is healed by the
processes' next renewal (each writes back the leases it holds; see `proxy.cluster.slots`).
`llama_proxies.shared` says whether a process has switched to this path; grants wait until every
live process has, so a process that still hands out slots by itself is never counted out.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SLOTS_CHANNEL = "llama_gate_slots"

GRANT_FUNCTION = f"""
CREATE FUNCTION llama_gate_slot_grant(p_lease_seconds double precision, p_stale_seconds
    double precision) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    w record;
    v_granted integer := 0;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.slots', 0));
    -- What gone processes held or waited for: their leases were not renewed.
    DELETE FROM llama_slot_leases WHERE expires_at < now();
    DELETE FROM llama_slot_waiters WHERE expires_at < now();
    -- A live process that has not switched to shared slots yet may hand out slots by itself.
    IF EXISTS (SELECT 1 FROM llama_proxies
               WHERE NOT shared AND seen_at >= now() - make_interval(secs => p_stale_seconds)) THEN
        RETURN 0;
    END IF;
    LOOP
        -- The next request: its user's first, the user served least recently first (never
        -- served: first of all), then who waited longest; on the free backend it prefers, else
        -- the least loaded free one among those that serve it.
        SELECT wt.id, wt.proxy_id, wt.user_id, f.backend INTO w
        FROM llama_slot_waiters wt
        LEFT JOIN llama_slot_turns t ON t.user_id = wt.user_id
        CROSS JOIN LATERAL (
            SELECT b.backend
            FROM llama_slot_backends b
            CROSS JOIN LATERAL (SELECT coalesce(sum(l.n), 0) AS busy FROM llama_slot_leases l
                                WHERE l.backend = b.backend) used
            WHERE b.backend = ANY (wt.backends) AND used.busy < b.slots
            ORDER BY b.backend IS NOT DISTINCT FROM wt.prefer DESC, used.busy::float / b.slots,
                     b.backend
            LIMIT 1
        ) f
        ORDER BY t.turn NULLS FIRST, wt.enqueued_at, wt.id
        LIMIT 1;
        EXIT WHEN NOT FOUND;
        DELETE FROM llama_slot_waiters WHERE id = w.id;
        INSERT INTO llama_slot_leases (id, backend, proxy_id, user_id, n, expires_at)
            VALUES (w.id, w.backend, w.proxy_id, w.user_id, 1,
                    now() + make_interval(secs => p_lease_seconds));
        INSERT INTO llama_slot_turns (user_id, turn) VALUES (w.user_id, clock_timestamp())
            ON CONFLICT (user_id) DO UPDATE SET turn = EXCLUDED.turn;
        PERFORM pg_notify('{SLOTS_CHANNEL}', w.proxy_id || ' ' || w.id || ' ' || w.backend);
        v_granted := v_granted + 1;
    END LOOP;
    RETURN v_granted;
END $$
"""

WAIT_FUNCTION = """
CREATE FUNCTION llama_gate_slot_wait(
    p_id bigint, p_proxy_id text, p_user_id bigint, p_backends text[], p_prefer text,
    p_cap integer, p_lease_seconds double precision, p_stale_seconds double precision
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_held integer;
    v_backend text;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    -- One user's requests are counted under one lock, so parallel ones cannot all pass the cap.
    PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.slots.' || p_user_id, 0));
    SELECT (SELECT count(*) FROM llama_slot_leases WHERE user_id = p_user_id AND NOT lone)
         + (SELECT count(*) FROM llama_slot_waiters WHERE user_id = p_user_id) INTO v_held;
    IF v_held >= p_cap THEN
        RETURN '!cap';
    END IF;
    INSERT INTO llama_slot_waiters (id, proxy_id, user_id, backends, prefer, enqueued_at,
                                    expires_at)
        VALUES (p_id, p_proxy_id, p_user_id, p_backends, p_prefer, clock_timestamp(),
                now() + make_interval(secs => p_lease_seconds));
    PERFORM llama_gate_slot_grant(p_lease_seconds, p_stale_seconds);
    SELECT backend INTO v_backend FROM llama_slot_leases WHERE id = p_id;
    RETURN v_backend;
END $$
"""

RELEASE_FUNCTION = """
CREATE FUNCTION llama_gate_slot_release(
    p_id bigint, p_lease_seconds double precision, p_stale_seconds double precision
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_user bigint;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM llama_slot_waiters WHERE id = p_id RETURNING user_id INTO v_user;
    IF v_user IS NULL THEN
        DELETE FROM llama_slot_leases WHERE id = p_id RETURNING user_id INTO v_user;
    END IF;
    -- A user with nothing held or waiting is forgotten: next time they count as never served.
    DELETE FROM llama_slot_turns t WHERE t.user_id = v_user
        AND NOT EXISTS (SELECT 1 FROM llama_slot_leases l WHERE l.user_id = v_user)
        AND NOT EXISTS (SELECT 1 FROM llama_slot_waiters w WHERE w.user_id = v_user);
    PERFORM llama_gate_slot_grant(p_lease_seconds, p_stale_seconds);
END $$
"""


def upgrade() -> None:
    op.add_column(
        "llama_proxies",
        sa.Column("shared", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.create_table(
        "llama_slot_backends",
        sa.Column("backend", sa.Text(), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("backend", name="pk_llama_slot_backends"),
        prefixes=["UNLOGGED"],
    )
    op.create_table(
        "llama_slot_leases",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("backend", sa.Text(), nullable=False),
        sa.Column("proxy_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=True),
        sa.Column("n", sa.Integer(), server_default="1", nullable=False),
        sa.Column("lone", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_llama_slot_leases"),
        prefixes=["UNLOGGED"],
    )
    op.create_index("ix_llama_slot_leases_backend", "llama_slot_leases", ["backend"])
    op.create_index("ix_llama_slot_leases_proxy_id", "llama_slot_leases", ["proxy_id"])
    op.create_index("ix_llama_slot_leases_user_id", "llama_slot_leases", ["user_id"])
    op.create_table(
        "llama_slot_waiters",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("proxy_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("backends", ARRAY(sa.Text()), nullable=False),
        sa.Column("prefer", sa.Text(), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_llama_slot_waiters"),
        prefixes=["UNLOGGED"],
    )
    op.create_index("ix_llama_slot_waiters_proxy_id", "llama_slot_waiters", ["proxy_id"])
    op.create_index("ix_llama_slot_waiters_user_id", "llama_slot_waiters", ["user_id"])
    op.create_table(
        "llama_slot_turns",
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("turn", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_llama_slot_turns"),
        prefixes=["UNLOGGED"],
    )
    op.execute(GRANT_FUNCTION)
    op.execute(WAIT_FUNCTION)
    op.execute(RELEASE_FUNCTION)


def downgrade() -> None:
    op.execute("DROP FUNCTION llama_gate_slot_release(bigint, double precision, double precision)")
    op.execute(
        "DROP FUNCTION llama_gate_slot_wait(bigint, text, bigint, text[], text, integer, "
        "double precision, double precision)"
    )
    op.execute("DROP FUNCTION llama_gate_slot_grant(double precision, double precision)")
    op.drop_table("llama_slot_turns")
    op.drop_table("llama_slot_waiters")
    op.drop_table("llama_slot_leases")
    op.drop_table("llama_slot_backends")
    op.drop_column("llama_proxies", "shared")
