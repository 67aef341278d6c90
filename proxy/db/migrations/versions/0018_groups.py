"""groups of users with token budgets per minute, day, week and month, in a time zone

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07

A group (a team, a class, a project) has members (`llama_group_members`) and token budgets
(`llama_groups.tokens_per_*`, NULL: none) counted over calendar periods in its `time_zone`: the
minute, the day, the ISO week (from Monday 00:00) and the month, each starting at midnight there.

Each group's use per period is a row of `llama_group_spend`, kept by two functions so that every
proxy process admits against the same figures (exact across processes):

- `llama_gate_group_reserve` is asked before a member's request may run, with what it can cost
  (its measured prompt and its answer's room): under each of the member's groups' advisory locks
  (in id order), it refuses the request when some budget has not room for its prompt and one
  answer token (saying which budget, and when its period ends), and otherwise charges every
  budget the prompt and as much of the answer as all of them have left (the answer's room is
  lowered to that, as with a user's token quota), and remembers the charge in `llama_group_holds`;
- `llama_gate_group_settle` is told what requests really cost once they ended, and moves each
  budget's figure from the charge to that.

So requests running at once can never together go over a budget: each was charged its largest
cost before it ran. A request whose process died before it settled keeps its whole charge (its
hold is dropped after a day); a budget never goes over for it, it only holds back up to one
answer's room until its period ends.

Both functions commit without waiting for the disk (`synchronous_commit` off for their own
transaction): a crash of Postgres can forget the last fraction of a second of charges. What the
requests really cost is in the ledger (`llama_requests`) as before; `llama_usage_daily_by_group`
reads it per group, member and UTC day.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GROUPS_CHANNEL = "llama_gate_groups"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
PERIODS = ("minute", "day", "week", "month")

NOTIFY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION llama_gate_groups_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{GROUPS_CHANNEL}', TG_TABLE_NAME);
    RETURN NULL;
END
$$
"""

RESERVE_FUNCTION = """
CREATE OR REPLACE FUNCTION llama_gate_group_reserve(
    p_user bigint, p_request text, p_prompt bigint, p_answer bigint, p_now timestamptz,
    OUT granted bigint, OUT group_name text, OUT period text, OUT used bigint,
    OUT budget bigint, OUT resets_at timestamptz, OUT refused boolean, OUT too_large boolean
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    g record;
    b record;
    v_now timestamptz := coalesce(p_now, clock_timestamp());
    v_need bigint := p_prompt + CASE WHEN p_answer > 0 THEN 1 ELSE 0 END;
    v_left bigint;
    v_local timestamp;
    v_start timestamptz;
    v_end timestamptz;
    v_used bigint;
    v_groups bigint[] := '{}';
    v_periods text[] := '{}';
    v_starts timestamptz[] := '{}';
BEGIN
    -- Everything here is also in the ledger; see the migration's note on crashes.
    PERFORM set_config('synchronous_commit', 'off', true);
    refused := false;
    too_large := false;
    FOR g IN
        SELECT gr.id, gr.name, gr.time_zone, gr.tokens_per_minute, gr.tokens_per_day,
               gr.tokens_per_week, gr.tokens_per_month
        FROM llama_groups gr JOIN llama_group_members m ON m.group_id = gr.id
        WHERE m.user_id = p_user
          AND num_nonnulls(gr.tokens_per_minute, gr.tokens_per_day, gr.tokens_per_week,
                           gr.tokens_per_month) > 0
        ORDER BY gr.id  -- one order for every caller: no deadlock between them
    LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.group.' || g.id, 0));
        FOR b IN
            SELECT v.per, v.lim FROM (VALUES ('minute', g.tokens_per_minute),
                ('day', g.tokens_per_day), ('week', g.tokens_per_week),
                ('month', g.tokens_per_month)) AS v(per, lim)
            WHERE v.lim IS NOT NULL
        LOOP
            v_local := date_trunc(b.per, v_now AT TIME ZONE g.time_zone);
            v_start := v_local AT TIME ZONE g.time_zone;
            v_end := (v_local + ('1 ' || b.per)::interval) AT TIME ZONE g.time_zone;
            SELECT s.tokens INTO v_used FROM llama_group_spend s
                WHERE s.group_id = g.id AND s.period = b.per AND s.starts = v_start;
            v_used := coalesce(v_used, 0);
            IF v_need > b.lim THEN  -- no wait would help
                granted := 0; refused := true; too_large := true;
                group_name := g.name; period := b.per;
                used := v_used; budget := b.lim; resets_at := v_end;
                RETURN;
            END IF;
            IF b.lim - v_used < greatest(v_need, 1) THEN
                -- Refused; of several budgets reached, the one that frees up last is told.
                IF NOT refused OR v_end > resets_at THEN
                    group_name := g.name; period := b.per; used := v_used; budget := b.lim;
                    resets_at := v_end;
                END IF;
                refused := true;
            ELSIF NOT refused AND (v_left IS NULL OR b.lim - v_used < v_left) THEN
                v_left := b.lim - v_used;
                group_name := g.name; period := b.per; used := v_used; budget := b.lim;
                resets_at := v_end;
            END IF;
            v_groups := v_groups || g.id;
            v_periods := v_periods || b.per::text;
            v_starts := v_starts || v_start;
        END LOOP;
    END LOOP;
    IF refused THEN
        granted := 0;
        RETURN;
    END IF;
    IF v_left IS NULL THEN  -- in no group with a budget
        granted := p_answer;
        RETURN;
    END IF;
    granted := least(p_answer, v_left - p_prompt);
    -- The tightest budget's figures (for the answer's x-ratelimit-*-tokens headers), charged.
    used := used + p_prompt + granted;
    INSERT INTO llama_group_spend (group_id, period, starts, tokens)
        SELECT c.group_id, c.per, c.starts, p_prompt + granted
        FROM unnest(v_groups, v_periods, v_starts) AS c(group_id, per, starts)
        ON CONFLICT (group_id, period, starts)
        DO UPDATE SET tokens = llama_group_spend.tokens + EXCLUDED.tokens;
    INSERT INTO llama_group_holds (request_id, group_id, period, starts, tokens, created_at)
        SELECT p_request, c.group_id, c.per, c.starts, p_prompt + granted, v_now
        FROM unnest(v_groups, v_periods, v_starts) AS c(group_id, per, starts)
        ON CONFLICT (request_id, group_id, period)
        DO UPDATE SET tokens = llama_group_holds.tokens + EXCLUDED.tokens;
    -- Periods that ended are history; the ledger keeps it.
    DELETE FROM llama_group_spend s
        USING unnest(v_groups, v_periods, v_starts) AS c(group_id, per, starts)
        WHERE s.group_id = c.group_id AND s.period = c.per AND s.starts < c.starts;
END
$$
"""

SETTLE_FUNCTION = """
CREATE OR REPLACE FUNCTION llama_gate_group_settle(p_requests text[], p_tokens bigint[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_group bigint;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR v_group IN
        SELECT DISTINCT h.group_id FROM llama_group_holds h
        WHERE h.request_id = ANY(p_requests) ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.group.' || v_group, 0));
    END LOOP;
    UPDATE llama_group_spend s SET tokens = greatest(0, s.tokens + d.delta)
    FROM (SELECT h.group_id, h.period, h.starts, sum(a.tokens - h.tokens) AS delta
          FROM llama_group_holds h
          JOIN unnest(p_requests, p_tokens) AS a(request_id, tokens)
            ON a.request_id = h.request_id
          GROUP BY 1, 2, 3) AS d
    WHERE s.group_id = d.group_id AND s.period = d.period AND s.starts = d.starts;
    DELETE FROM llama_group_holds h WHERE h.request_id = ANY(p_requests);
    -- A hold whose request never said what it cost (its process died) keeps its charge.
    DELETE FROM llama_group_holds h WHERE h.created_at < now() - interval '1 day';
END
$$
"""

USAGE_BY_GROUP_VIEW = """
CREATE VIEW llama_usage_daily_by_group AS
SELECT (r.created_at AT TIME ZONE 'UTC')::date AS day,
       g.name AS group_name,
       r.username,
       count(*) AS requests,
       count(*) FILTER (WHERE r.status_code >= 400) AS errors,
       coalesce(sum(r.prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(r.completion_tokens), 0) AS completion_tokens
FROM llama_requests r
JOIN llama_group_members m ON m.user_id = r.user_id
JOIN llama_groups g ON g.id = m.group_id
GROUP BY 1, 2, 3
"""


def upgrade() -> None:
    op.create_table(
        "llama_groups",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("time_zone", sa.Text(), server_default="UTC", nullable=False),
        *(sa.Column(f"tokens_per_{per}", sa.BigInteger(), nullable=True) for per in PERIODS),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_llama_groups"),
        sa.UniqueConstraint("name", name="uq_llama_groups_name"),
        sa.CheckConstraint(f"name ~ '{NAME_PATTERN}'", name=op.f("ck_llama_groups_name_format")),
        *(
            sa.CheckConstraint(
                f"tokens_per_{per} IS NULL OR tokens_per_{per} > 0",
                name=op.f(f"ck_llama_groups_tokens_per_{per}_positive"),
            )
            for per in PERIODS
        ),
    )
    op.create_table(
        "llama_group_members",
        sa.Column("group_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["llama_groups.id"],
            name="fk_llama_group_members_group_id_llama_groups",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name="fk_llama_group_members_user_id_users",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "user_id", name="pk_llama_group_members"),
    )
    op.create_index("ix_llama_group_members_user_id", "llama_group_members", ["user_id"])
    op.create_table(
        "llama_group_spend",
        sa.Column("group_id", sa.BigInteger(), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("starts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["llama_groups.id"],
            name="fk_llama_group_spend_group_id_llama_groups",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "period", "starts", name="pk_llama_group_spend"),
    )
    op.create_table(
        "llama_group_holds",
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("group_id", sa.BigInteger(), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("starts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["llama_groups.id"],
            name="fk_llama_group_holds_group_id_llama_groups",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("request_id", "group_id", "period", name="pk_llama_group_holds"),
    )
    op.create_index("ix_llama_group_holds_created_at", "llama_group_holds", ["created_at"])
    op.execute(NOTIFY_FUNCTION)
    for table in ("llama_groups", "llama_group_members"):
        op.execute(
            f"CREATE TRIGGER {table}_notify AFTER INSERT OR UPDATE OR DELETE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION llama_gate_groups_notify()"
        )
    op.execute(RESERVE_FUNCTION)
    op.execute(SETTLE_FUNCTION)
    op.execute(USAGE_BY_GROUP_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW llama_usage_daily_by_group")
    op.execute("DROP FUNCTION llama_gate_group_settle(text[], bigint[])")
    op.execute("DROP FUNCTION llama_gate_group_reserve(bigint, text, bigint, bigint, timestamptz)")
    op.drop_table("llama_group_holds")
    op.drop_table("llama_group_spend")
    op.drop_table("llama_group_members")
    op.drop_table("llama_groups")
    op.execute("DROP FUNCTION llama_gate_groups_notify()")
