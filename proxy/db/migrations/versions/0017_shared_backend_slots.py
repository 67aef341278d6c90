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
lock), and NOTIFYs the process owning the request on `llama_gate_slots`. Which backend last
served a conversation (`llama_slot_conversations`, by digest, never text) is shared the same way.

All six tables are UNLOGGED and the functions commit without waiting for the disk: what they hold
lives as long as the requests do, and a crash of Postgres, which empties them, is healed by the
processes' next renewal (each writes back its backends' slots and the leases it holds, and its
waiting requests queue again; see `proxy.cluster.slots`): `llama_slot_epoch`, emptied with them,
is begun again by the first renewal, and grants wait until every process has renewed.
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
CREATE FUNCTION llama_gate_slot_grant(
    p_lease_seconds double precision, p_stale_seconds double precision,
    p_quiet bigint[] DEFAULT '{{}}', p_expire boolean DEFAULT false
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    w record;
    b text;
    v_best text;
    v_free jsonb;  -- backend -> slots free now
    v_granted integer := 0;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.slots', 0));
    -- What gone processes held or waited for: their leases were not renewed (asked by the
    -- processes' polls, every second while requests wait: not on every grant).
    -- Rows another transaction holds (a release deleting them) are skipped, here and below:
    -- waiting for one while holding the lock that release waits for would deadlock.
    IF p_expire THEN
        DELETE FROM llama_slot_leases WHERE id IN (
            SELECT id FROM llama_slot_leases WHERE expires_at < now() FOR UPDATE SKIP LOCKED);
        DELETE FROM llama_slot_waiters WHERE id IN (
            SELECT id FROM llama_slot_waiters WHERE expires_at < now() FOR UPDATE SKIP LOCKED);
        DELETE FROM llama_slot_conversations WHERE seen_at < now() - interval '1 day';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM llama_slot_waiters) THEN
        RETURN 0;
    END IF;
    -- After a crash of Postgres emptied these tables, every process writes back what it holds
    -- at its next renewal (every 2 s): nothing is granted until all have (the epoch is 3 s old).
    IF NOT EXISTS (SELECT 1 FROM llama_slot_epoch WHERE began < now() - interval '3 seconds') THEN
        RETURN 0;
    END IF;
    -- A live process that has not switched to shared slots yet may hand out slots by itself.
    IF EXISTS (SELECT 1 FROM llama_proxies
               WHERE NOT shared AND seen_at >= now() - make_interval(secs => p_stale_seconds)) THEN
        RETURN 0;
    END IF;
    SELECT coalesce(jsonb_object_agg(s.backend, s.slots - coalesce(u.busy, 0)), '{{}}') INTO v_free
    FROM llama_slot_backends s
    LEFT JOIN (SELECT backend, sum(n) AS busy FROM llama_slot_leases GROUP BY backend) u
        USING (backend);
    -- Round robin in one pass: every user's first waiting request, the user served least
    -- recently first (never served: first of all), then every user's second, and so on; each on
    -- the free backend it prefers, else on the one of its backends with the most slots free.
    FOR w IN
        SELECT wt.id, wt.proxy_id, wt.user_id, wt.backends, wt.prefer, wt.conversation
        FROM (SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY enqueued_at, id) AS rank
              FROM llama_slot_waiters) wt
        LEFT JOIN llama_slot_turns t ON t.user_id = wt.user_id
        ORDER BY wt.rank, t.turn NULLS FIRST, wt.enqueued_at, wt.id
    LOOP
        EXIT WHEN NOT EXISTS (SELECT 1 FROM jsonb_each_text(v_free) f WHERE f.value::int > 0);
        v_best := NULL;
        IF w.prefer = ANY (w.backends) AND coalesce((v_free ->> w.prefer)::int, 0) > 0 THEN
            v_best := w.prefer;
        ELSE
            FOREACH b IN ARRAY w.backends LOOP
                IF coalesce((v_free ->> b)::int, 0) > 0
                   AND (v_best IS NULL OR (v_free ->> b)::int > (v_free ->> v_best)::int) THEN
                    v_best := b;
                END IF;
            END LOOP;
        END IF;
        CONTINUE WHEN v_best IS NULL;
        -- Gone meanwhile (its client left: a release holds or deleted it): not granted.
        DELETE FROM llama_slot_waiters WHERE id = (
            SELECT id FROM llama_slot_waiters WHERE id = w.id FOR UPDATE SKIP LOCKED);
        CONTINUE WHEN NOT FOUND;
        v_free := jsonb_set(v_free, ARRAY[v_best], to_jsonb((v_free ->> v_best)::int - 1));
        INSERT INTO llama_slot_leases (id, backend, proxy_id, user_id, n, expires_at)
            VALUES (w.id, v_best, w.proxy_id, w.user_id, 1,
                    now() + make_interval(secs => p_lease_seconds));
        INSERT INTO llama_slot_turns (user_id, turn) VALUES (w.user_id, clock_timestamp())
            ON CONFLICT (user_id) DO UPDATE SET turn = EXCLUDED.turn;
        IF w.conversation IS NOT NULL THEN  -- its next turn is warm there
            INSERT INTO llama_slot_conversations (digest, backend, seen_at)
                VALUES (w.conversation, v_best, now())
                ON CONFLICT (digest) DO UPDATE SET backend = EXCLUDED.backend, seen_at = now();
        END IF;
        -- The caller hears of its own requests' grants in its answer (p_quiet); others by this.
        IF NOT w.id = ANY (p_quiet) THEN
            PERFORM pg_notify('{SLOTS_CHANNEL}', w.proxy_id || ' ' || w.id || ' ' || v_best);
        END IF;
        v_granted := v_granted + 1;
    END LOOP;
    RETURN v_granted;
END $$
"""

WAIT_FUNCTION = """
CREATE FUNCTION llama_gate_slot_wait(
    p_proxy_id text, p_requests jsonb, p_lease_seconds double precision,
    p_stale_seconds double precision
) RETURNS jsonb LANGUAGE plpgsql AS $$
-- p_requests: [{"id", "user", "backends", "prefer", "cap", "conversation", "prefixes"}], the
-- requests of one proxy that arrived together (a batch). A request that continues a
-- conversation ("prefixes": digests of the conversations it may continue, longest first)
-- prefers the backend that served that conversation last, through whichever process (else the
-- one its own process remembers, "prefer"). The answer: {"<id>": the backend granted at once,
-- null to wait for a grant, or "!cap" when the user already holds `cap` places across
-- processes}.
DECLARE
    r jsonb;
    v_user bigint;
    v_prefer text;
    v_held integer;
    v_ids bigint[] := '{}';
    v_answer jsonb := '{}';
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    -- Users' locks in one order (a batch may hold several users' requests): no deadlock.
    PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.slots.' || u, 0))
        FROM (SELECT DISTINCT (e ->> 'user')::bigint AS u
              FROM jsonb_array_elements(p_requests) e ORDER BY 1) users;
    FOR r IN SELECT * FROM jsonb_array_elements(p_requests) LOOP
        v_user := (r ->> 'user')::bigint;
        SELECT (SELECT count(*) FROM llama_slot_leases WHERE user_id = v_user AND NOT lone)
             + (SELECT count(*) FROM llama_slot_waiters WHERE user_id = v_user) INTO v_held;
        IF v_held >= (r ->> 'cap')::integer THEN
            v_answer := v_answer || jsonb_build_object(r ->> 'id', '!cap');
            CONTINUE;
        END IF;
        v_prefer := NULL;
        IF jsonb_typeof(r -> 'prefixes') = 'array' THEN
            SELECT c.backend INTO v_prefer
            FROM jsonb_array_elements_text(r -> 'prefixes') WITH ORDINALITY AS p(digest, i)
            JOIN llama_slot_conversations c ON c.digest = p.digest
            ORDER BY p.i LIMIT 1;
        END IF;
        v_prefer := coalesce(v_prefer, r ->> 'prefer');
        INSERT INTO llama_slot_waiters (id, proxy_id, user_id, backends, prefer, conversation,
                                        enqueued_at, expires_at)
            VALUES ((r ->> 'id')::bigint, p_proxy_id, v_user,
                    ARRAY(SELECT jsonb_array_elements_text(r -> 'backends')), v_prefer,
                    r ->> 'conversation', clock_timestamp(),
                    now() + make_interval(secs => p_lease_seconds));
        v_ids := v_ids || (r ->> 'id')::bigint;
    END LOOP;
    PERFORM llama_gate_slot_grant(p_lease_seconds, p_stale_seconds, v_ids);
    SELECT v_answer || coalesce(jsonb_object_agg(i::text, l.backend), '{}') INTO v_answer
    FROM unnest(v_ids) AS i LEFT JOIN llama_slot_leases l ON l.id = i;
    RETURN v_answer;
END $$
"""

RELEASE_FUNCTION = """
CREATE FUNCTION llama_gate_slot_release(
    p_ids bigint[], p_lease_seconds double precision, p_stale_seconds double precision
) RETURNS void LANGUAGE plpgsql AS $$
-- Requests that ended, or stopped waiting (a batch): their leases or places in the wait go.
DECLARE
    v_users bigint[];
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH gone AS (
        DELETE FROM llama_slot_waiters WHERE id = ANY (p_ids) RETURNING user_id
    ), ended AS (
        DELETE FROM llama_slot_leases WHERE id = ANY (p_ids) RETURNING user_id
    )
    SELECT array_agg(DISTINCT user_id) INTO v_users
    FROM (SELECT user_id FROM gone UNION ALL SELECT user_id FROM ended) e;
    -- A user with nothing held or waiting is forgotten: next time they count as never served.
    DELETE FROM llama_slot_turns t WHERE t.user_id = ANY (v_users)
        AND NOT EXISTS (SELECT 1 FROM llama_slot_leases l WHERE l.user_id = t.user_id)
        AND NOT EXISTS (SELECT 1 FROM llama_slot_waiters w WHERE w.user_id = t.user_id);
    -- With nobody waiting there is nothing to grant, and no need to queue for the lock: a
    -- request queued meanwhile has its own call grant it (or the next poll, within a second).
    IF EXISTS (SELECT 1 FROM llama_slot_waiters) THEN
        PERFORM llama_gate_slot_grant(p_lease_seconds, p_stale_seconds);
    END IF;
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
        sa.Column("conversation", sa.Text(), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_llama_slot_waiters"),
        prefixes=["UNLOGGED"],
    )
    op.create_index("ix_llama_slot_waiters_proxy_id", "llama_slot_waiters", ["proxy_id"])
    op.create_index("ix_llama_slot_waiters_user_id", "llama_slot_waiters", ["user_id"])
    op.create_table(
        "llama_slot_conversations",
        sa.Column("digest", sa.Text(), nullable=False),
        sa.Column("backend", sa.Text(), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_llama_slot_conversations"),
        prefixes=["UNLOGGED"],
    )
    op.create_table(
        "llama_slot_turns",
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("turn", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_llama_slot_turns"),
        prefixes=["UNLOGGED"],
    )
    op.create_table(
        "llama_slot_epoch",
        sa.Column("one", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("began", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("one", name="pk_llama_slot_epoch"),
        sa.CheckConstraint("one", name=op.f("ck_llama_slot_epoch_one_row")),
        prefixes=["UNLOGGED"],
    )
    # Long begun: only a crash of Postgres, which empties it, starts a new epoch.
    op.execute("INSERT INTO llama_slot_epoch (began) VALUES ('-infinity')")
    op.execute(GRANT_FUNCTION)
    op.execute(WAIT_FUNCTION)
    op.execute(RELEASE_FUNCTION)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION llama_gate_slot_release(bigint[], double precision, double precision)"
    )
    op.execute(
        "DROP FUNCTION llama_gate_slot_wait(text, jsonb, double precision, double precision)"
    )
    op.execute(
        "DROP FUNCTION llama_gate_slot_grant(double precision, double precision, bigint[], boolean)"
    )
    op.drop_table("llama_slot_epoch")
    op.drop_table("llama_slot_turns")
    op.drop_table("llama_slot_conversations")
    op.drop_table("llama_slot_waiters")
    op.drop_table("llama_slot_leases")
    op.drop_table("llama_slot_backends")
    op.drop_column("llama_proxies", "shared")
