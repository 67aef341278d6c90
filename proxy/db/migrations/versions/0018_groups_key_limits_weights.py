"""groups with budgets and limits, keys with their own limits and budgets, model weights

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07

A group (a team, a class, a project) has members (`llama_group_members`), its own request limit
(`rate_limit` per `rate_window_seconds`), a cap on its members' requests at once
(`max_concurrent`), and token budgets (`tokens_per_*`, NULL: none) counted over calendar periods
in its `time_zone`: the minute, the day, the ISO week (from Monday 00:00) and the month, each
from midnight there. A key may have the same (`api_keys.rate_limit`, ..., `tokens_per_*`, its
periods in UTC). A model may have a weight (`llama_model_weights`, default 1): budgets and
token quotas count a request's tokens times its model's weight; its row keeps the raw tokens and
the weight applied (`llama_requests.weight`).

Each budget holder's use per period (a group's: `g:<id>`, a key's: `k:<key id>`, where a key
rotated from another keeps the first one's id, `api_keys.limits_key`, so the old key in its grace
and the new one spend one budget) is a row of
`llama_budget_spend`, kept by two functions so that every proxy process admits against the same
figures (exact across processes):

- `llama_gate_budget_reserve` is asked before a request may run, with what it can cost (its
  measured prompt and its answer's room) and its model's weight: under each holder's advisory
  lock (in one order), it refuses the request when some budget has not room for its prompt and
  one answer token (saying which, and when its period ends), and otherwise charges every budget
  the prompt and as much of the answer as all of them have left (the answer's room is lowered to
  that, as with a user's token quota), remembering the charge in `llama_budget_holds`;
- `llama_gate_budget_settle` is told what requests really cost once they ended, and moves each
  budget's figure from the charge to that.

So requests running at once can never together go over a budget: each was charged its largest
cost before it ran (when its backend can measure prompts, as llama-gate's launcher does; behind a
plain llama_cpp.server a prompt is charged only when its request ends, as with users' quotas).
A request whose process died before it settled keeps its whole charge (its hold is dropped after
a day): a budget never goes over for it, it only holds back up to one answer's room until its
period ends. Minute budgets are counted in UTC minutes (no minute is ambiguous when a zone's
clocks go back).

Request limits of keys and groups are sliding windows like users' (migration 0002/0013), in
`rate_subject_admissions` and `rate_subject_windows` (UNLOGGED), decided by
`llama_gate_admit_subject` (subjects `k:<key id>` and `g:<group id>`).

When several proxy processes share the backends' slots (0017), a freed slot goes round groups
first, then round a group's users, as one process's queue does (`llama_gate_slot_grant` is
replaced; without groups its order is 0017's), and a group's cap on its members' requests at
once is counted across processes as a user's is (`llama_gate_slot_wait` is replaced).

The functions commit without waiting for the disk (`synchronous_commit` off for their own
transaction): a crash of Postgres can forget the last fraction of a second of charges. What
requests really cost is in the ledger as before; `llama_usage_daily_by_group` reads it per group,
member and UTC day.
"""

from __future__ import annotations

import importlib
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
LIMITS = ("rate_limit", "rate_window_seconds", "max_concurrent")

NOTIFY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION llama_gate_groups_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{GROUPS_CHANNEL}', TG_TABLE_NAME);
    RETURN NULL;
END
$$
"""

# The budget holders a request answers to: the user's groups with a budget, and its key if it
# has one; each with its name for messages, its time zone and its budgets.
HOLDERS = """
    SELECT 'g:' || gr.id AS holder, 'group ' || quote_literal(gr.name) AS label,
           gr.time_zone, gr.tokens_per_minute, gr.tokens_per_day, gr.tokens_per_week,
           gr.tokens_per_month
    FROM llama_groups gr JOIN llama_group_members m ON m.group_id = gr.id
    WHERE m.user_id = p_user
      AND num_nonnulls(gr.tokens_per_minute, gr.tokens_per_day, gr.tokens_per_week,
                       gr.tokens_per_month) > 0
    UNION ALL
    SELECT 'k:' || coalesce(k.limits_key, k.key_id), 'key ' || k.key_id, 'UTC',
           k.tokens_per_minute, k.tokens_per_day,
           k.tokens_per_week, k.tokens_per_month
    FROM api_keys k
    WHERE k.key_id = p_key
      AND num_nonnulls(k.tokens_per_minute, k.tokens_per_day, k.tokens_per_week,
                       k.tokens_per_month) > 0
"""

RESERVE_FUNCTION = f"""
CREATE OR REPLACE FUNCTION llama_gate_budget_reserve(
    p_user bigint, p_key text, p_request text, p_prompt bigint, p_answer bigint,
    p_weight double precision, p_now timestamptz,
    OUT granted bigint, OUT holder text, OUT period text, OUT used bigint,
    OUT budget bigint, OUT resets_at timestamptz, OUT refused boolean, OUT too_large boolean
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    h record;
    b record;
    v_now timestamptz := coalesce(p_now, clock_timestamp());
    v_weight double precision := greatest(coalesce(p_weight, 1), 0.000001);
    v_need bigint := p_prompt + CASE WHEN p_answer > 0 THEN 1 ELSE 0 END;
    v_cost bigint;
    v_left bigint;  -- raw tokens every budget still has room for
    v_room bigint;
    v_local timestamp;
    v_zone text;
    v_start timestamptz;
    v_end timestamptz;
    v_used bigint;
    v_holders text[] := '{{}}';
    v_periods text[] := '{{}}';
    v_starts timestamptz[] := '{{}}';
BEGIN
    -- Everything here is also in the ledger; see the migration's note on crashes.
    PERFORM set_config('synchronous_commit', 'off', true);
    refused := false;
    too_large := false;
    FOR h IN SELECT * FROM ({HOLDERS}) AS x ORDER BY x.holder  -- one order: no deadlock
    LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.budget.' || h.holder, 0));
        FOR b IN
            SELECT v.per, v.lim FROM (VALUES ('minute', h.tokens_per_minute),
                ('day', h.tokens_per_day), ('week', h.tokens_per_week),
                ('month', h.tokens_per_month)) AS v(per, lim)
            WHERE v.lim IS NOT NULL
        LOOP
            -- Minutes are the same everywhere: counted in UTC, none is ambiguous when a
            -- zone's clocks go back an hour.
            v_zone := CASE WHEN b.per = 'minute' THEN 'UTC' ELSE h.time_zone END;
            v_local := date_trunc(b.per, v_now AT TIME ZONE v_zone);
            v_start := v_local AT TIME ZONE v_zone;
            v_end := (v_local + ('1 ' || b.per)::interval) AT TIME ZONE v_zone;
            SELECT s.tokens INTO v_used FROM llama_budget_spend s
                WHERE s.holder = h.holder AND s.period = b.per AND s.starts = v_start;
            v_used := coalesce(v_used, 0);
            IF ceil(v_need * v_weight) > b.lim THEN  -- no wait would help
                granted := 0; refused := true; too_large := true;
                holder := h.label; period := b.per;
                used := v_used; budget := b.lim; resets_at := v_end;
                RETURN;
            END IF;
            v_room := floor((b.lim - v_used) / v_weight)::bigint;
            IF v_room < greatest(v_need, 1) THEN
                -- Refused; of several budgets reached, the one that frees up last is told.
                IF NOT refused OR v_end > resets_at THEN
                    holder := h.label; period := b.per; used := v_used; budget := b.lim;
                    resets_at := v_end;
                END IF;
                refused := true;
            ELSIF NOT refused AND (v_left IS NULL OR v_room < v_left) THEN
                v_left := v_room;
                holder := h.label; period := b.per; used := v_used; budget := b.lim;
                resets_at := v_end;
            END IF;
            v_holders := v_holders || h.holder;
            v_periods := v_periods || b.per::text;
            v_starts := v_starts || v_start;
        END LOOP;
    END LOOP;
    IF refused THEN
        granted := 0;
        RETURN;
    END IF;
    IF v_left IS NULL THEN  -- no budget applies
        granted := p_answer;
        RETURN;
    END IF;
    granted := least(p_answer, v_left - p_prompt);
    v_cost := ceil((p_prompt + granted) * v_weight);
    -- The tightest budget's figures (for the answer's x-ratelimit-*-tokens headers), charged.
    used := used + v_cost;
    INSERT INTO llama_budget_spend (holder, period, starts, tokens)
        SELECT c.holder, c.per, c.starts, v_cost
        FROM unnest(v_holders, v_periods, v_starts) AS c(holder, per, starts)
        ON CONFLICT (holder, period, starts)
        DO UPDATE SET tokens = llama_budget_spend.tokens + EXCLUDED.tokens;
    INSERT INTO llama_budget_holds (request_id, holder, period, starts, tokens, created_at)
        SELECT p_request, c.holder, c.per, c.starts, v_cost, v_now
        FROM unnest(v_holders, v_periods, v_starts) AS c(holder, per, starts)
        ON CONFLICT (request_id, holder, period)
        DO UPDATE SET tokens = llama_budget_holds.tokens + EXCLUDED.tokens;
    -- Periods that ended are history; the ledger keeps it.
    DELETE FROM llama_budget_spend s
        USING unnest(v_holders, v_periods, v_starts) AS c(holder, per, starts)
        WHERE s.holder = c.holder AND s.period = c.per AND s.starts < c.starts;
END
$$
"""

SETTLE_FUNCTION = """
CREATE OR REPLACE FUNCTION llama_gate_budget_settle(p_requests text[], p_costs bigint[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_holder text;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR v_holder IN
        SELECT DISTINCT h.holder FROM llama_budget_holds h
        WHERE h.request_id = ANY(p_requests) ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.budget.' || v_holder, 0));
    END LOOP;
    -- p_costs are weighted tokens, as the charges are.
    UPDATE llama_budget_spend s SET tokens = greatest(0, s.tokens + d.delta)
    FROM (SELECT h.holder, h.period, h.starts, sum(a.cost - h.tokens) AS delta
          FROM llama_budget_holds h
          JOIN unnest(p_requests, p_costs) AS a(request_id, cost)
            ON a.request_id = h.request_id
          GROUP BY 1, 2, 3) AS d
    WHERE s.holder = d.holder AND s.period = d.period AND s.starts = d.starts;
    DELETE FROM llama_budget_holds h WHERE h.request_id = ANY(p_requests);
    -- A hold whose request never said what it cost (its process died) keeps its charge.
    DELETE FROM llama_budget_holds h WHERE h.created_at < now() - interval '1 day';
END
$$
"""

# Users' sliding windows (0013's llama_gate_admit), for other subjects: keys and groups.
ADMIT_SUBJECT_FUNCTION = """
CREATE OR REPLACE FUNCTION llama_gate_admit_subject(
    p_subject text, p_limit integer, p_window_ms integer, p_count integer,
    OUT granted integer, OUT remaining integer, OUT reset_ms integer, OUT retry_after_ms integer
) LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz;
    v_window interval := p_window_ms * interval '1 millisecond';
    v_expired integer;
    v_count integer;
    v_free timestamptz;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);  -- UNLOGGED tables only
    PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.rate.' || p_subject, 0));
    v_now := clock_timestamp();
    DELETE FROM rate_subject_admissions
        WHERE subject = p_subject AND admitted_at <= v_now - v_window;
    GET DIAGNOSTICS v_expired = ROW_COUNT;
    UPDATE rate_subject_windows SET admissions = admissions - v_expired
        WHERE subject = p_subject RETURNING admissions INTO v_count;
    IF NOT FOUND OR v_count < 0 THEN
        SELECT count(*) INTO v_count FROM rate_subject_admissions a WHERE a.subject = p_subject;
        INSERT INTO rate_subject_windows (subject, admissions) VALUES (p_subject, v_count)
            ON CONFLICT (subject) DO UPDATE SET admissions = EXCLUDED.admissions;
    END IF;
    granted := least(p_count, greatest(p_limit - v_count, 0));
    IF granted > 0 THEN
        INSERT INTO rate_subject_admissions (subject, admitted_at)
            SELECT p_subject, v_now FROM generate_series(1, granted);
        UPDATE rate_subject_windows SET admissions = admissions + granted
            WHERE subject = p_subject;
    END IF;
    remaining := greatest(p_limit - v_count - granted, 0);
    IF granted = p_count THEN
        SELECT min(a.admitted_at) INTO v_free FROM rate_subject_admissions a
            WHERE a.subject = p_subject;
    ELSE
        SELECT a.admitted_at INTO v_free FROM rate_subject_admissions a
            WHERE a.subject = p_subject
            ORDER BY a.admitted_at OFFSET v_count + granted - p_limit LIMIT 1;
    END IF;
    reset_ms := greatest(1, ceil(extract(epoch FROM v_free + v_window - v_now) * 1000))::integer;
    retry_after_ms := CASE WHEN granted = p_count THEN 0 ELSE reset_ms END;
END
$$
"""

# A change of a key's limits or budgets reaches every proxy's key cache at once.
KEY_LIMITS_TRIGGER = f"""
CREATE TRIGGER api_keys_notify_auth_limits
    AFTER UPDATE OF rate_limit, rate_window_seconds,
        {", ".join(f"tokens_per_{p}" for p in PERIODS)}
    ON api_keys FOR EACH ROW EXECUTE FUNCTION llama_gate_notify_auth()
"""

# Shared backend slots (0017) go round groups first, then round a group's users, as one
# process's queue does (`proxy.upstream.fairqueue`): each group's first waiting request, the
# group served least recently first, then each group's second, ...; within a group its users in
# turn. A user's group is their first (lowest id); a user in no group is a group of their own,
# so without groups the order is 0017's.
_SLOTS = importlib.import_module("proxy.db.migrations.versions.0017_shared_backend_slots")
_ORDER_0017 = """
        SELECT wt.id, wt.proxy_id, wt.user_id, wt.backends, wt.prefer, wt.conversation
        FROM (SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY enqueued_at, id) AS rank
              FROM llama_slot_waiters) wt
        LEFT JOIN llama_slot_turns t ON t.user_id = wt.user_id
        ORDER BY wt.rank, t.turn NULLS FIRST, wt.enqueued_at, wt.id
"""
_ORDER_BY_GROUPS = """
        WITH teams AS (
            SELECT m.user_id, 'g' || min(m.group_id) AS team FROM llama_group_members m
            WHERE m.user_id IN (SELECT user_id FROM llama_slot_waiters
                                UNION SELECT user_id FROM llama_slot_turns)
            GROUP BY m.user_id
        ), turns AS (
            SELECT t.user_id, t.turn, coalesce(g.team, 'u' || t.user_id) AS team
            FROM llama_slot_turns t LEFT JOIN teams g ON g.user_id = t.user_id
        ), ranked AS (
            SELECT x.*, coalesce(g.team, 'u' || x.user_id) AS team, ut.turn AS user_turn,
                   row_number() OVER (PARTITION BY x.user_id ORDER BY x.enqueued_at, x.id)
                       AS rank
            FROM llama_slot_waiters x
            LEFT JOIN teams g ON g.user_id = x.user_id
            LEFT JOIN turns ut ON ut.user_id = x.user_id
        )
        SELECT wt.id, wt.proxy_id, wt.user_id, wt.backends, wt.prefer, wt.conversation
        FROM (SELECT r.*, row_number() OVER (
                     PARTITION BY r.team ORDER BY r.rank, r.user_turn NULLS FIRST, r.enqueued_at,
                                                  r.id) AS team_rank
              FROM ranked r) wt
        LEFT JOIN (SELECT team, max(turn) AS turn FROM turns GROUP BY team) tt
               ON tt.team = wt.team
        ORDER BY wt.team_rank, tt.turn NULLS FIRST, wt.user_turn NULLS FIRST, wt.enqueued_at,
                 wt.id
"""
assert _ORDER_0017 in _SLOTS.GRANT_FUNCTION
GRANT_0017 = _SLOTS.GRANT_FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
GRANT_BY_GROUPS = GRANT_0017.replace(_ORDER_0017, _ORDER_BY_GROUPS)

# A group's cap on its members' requests at once, counted across processes as a request joins
# the wait, as a user's is: each request may carry "groups": [[group id, cap], ...]; one whose
# group is full is answered "!gcap:<group id>".
WAIT_0017 = _SLOTS.WAIT_FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
_WAIT_EDITS = (
    ("    v_answer jsonb := '{}';\n", "    v_answer jsonb := '{}';\n    v_full text;\n"),
    (
        "              FROM jsonb_array_elements(p_requests) e ORDER BY 1) users;\n",
        """              FROM jsonb_array_elements(p_requests) e ORDER BY 1) users;
    -- Groups' locks likewise, always after the users': no deadlock either.
    PERFORM pg_advisory_xact_lock(hashtextextended('llama_gate.slots.group.' || g, 0))
        FROM (SELECT DISTINCT (x ->> 0)::bigint AS g
              FROM jsonb_array_elements(p_requests) e,
                   jsonb_array_elements(coalesce(e -> 'groups', '[]'::jsonb)) x
              ORDER BY 1) capped;
""",
    ),
    (
        "            CONTINUE;\n        END IF;\n        v_prefer := NULL;\n",
        """            CONTINUE;
        END IF;
        SELECT x ->> 0 INTO v_full
        FROM jsonb_array_elements(coalesce(r -> 'groups', '[]'::jsonb)) x
        WHERE (SELECT count(*) FROM llama_slot_leases l
               JOIN llama_group_members m ON m.user_id = l.user_id
               WHERE m.group_id = (x ->> 0)::bigint AND NOT l.lone)
            + (SELECT count(*) FROM llama_slot_waiters w
               JOIN llama_group_members m ON m.user_id = w.user_id
               WHERE m.group_id = (x ->> 0)::bigint) >= (x ->> 1)::integer
        LIMIT 1;
        IF v_full IS NOT NULL THEN
            v_answer := v_answer || jsonb_build_object(r ->> 'id', '!gcap:' || v_full);
            CONTINUE;
        END IF;
        v_prefer := NULL;
""",
    ),
)
WAIT_WITH_GROUPS = WAIT_0017
for _old, _new in _WAIT_EDITS:
    assert WAIT_WITH_GROUPS.count(_old) == 1, _old
    WAIT_WITH_GROUPS = WAIT_WITH_GROUPS.replace(_old, _new)

# A user's turn is forgotten once neither they nor anyone in a group of theirs holds or waits for
# a slot (a group's turn, the latest of its users', lasts while any of them is active).
RELEASE_0017 = _SLOTS.RELEASE_FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
_FORGET_0017 = """    DELETE FROM llama_slot_turns t WHERE t.user_id = ANY (v_users)
        AND NOT EXISTS (SELECT 1 FROM llama_slot_leases l WHERE l.user_id = t.user_id)
        AND NOT EXISTS (SELECT 1 FROM llama_slot_waiters w WHERE w.user_id = t.user_id);
"""
_FORGET_BY_GROUPS = """    DELETE FROM llama_slot_turns t
    WHERE (t.user_id = ANY (v_users) OR t.user_id IN (
               SELECT m2.user_id FROM llama_group_members m1
               JOIN llama_group_members m2 ON m2.group_id = m1.group_id
               WHERE m1.user_id = ANY (v_users)))
      AND NOT EXISTS (
          SELECT 1 FROM (SELECT t.user_id AS user_id
                         UNION SELECT m2.user_id FROM llama_group_members m1
                               JOIN llama_group_members m2 ON m2.group_id = m1.group_id
                               WHERE m1.user_id = t.user_id) mates
          WHERE EXISTS (SELECT 1 FROM llama_slot_leases l WHERE l.user_id = mates.user_id)
             OR EXISTS (SELECT 1 FROM llama_slot_waiters w WHERE w.user_id = mates.user_id));
"""
assert RELEASE_0017.count(_FORGET_0017) == 1
RELEASE_BY_GROUPS = RELEASE_0017.replace(_FORGET_0017, _FORGET_BY_GROUPS)

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


def _positive(table: str, column: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(
        f"{column} IS NULL OR {column} > 0", name=op.f(f"ck_{table}_{column}_positive")
    )


def _quota_index(include: list[str]) -> None:
    """Quotas read a user's tokens (now times their weight) from the index alone."""
    op.drop_index("ix_llama_requests_user_id_created_at", table_name="llama_requests")
    op.create_index(
        "ix_llama_requests_user_id_created_at",
        "llama_requests",
        ["user_id", "created_at"],
        postgresql_include=include,
    )


def upgrade() -> None:
    op.create_table(
        "llama_groups",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("time_zone", sa.Text(), server_default="UTC", nullable=False),
        *(sa.Column(column, sa.Integer(), nullable=True) for column in LIMITS),
        *(sa.Column(f"tokens_per_{per}", sa.BigInteger(), nullable=True) for per in PERIODS),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_llama_groups"),
        sa.UniqueConstraint("name", name="uq_llama_groups_name"),
        sa.CheckConstraint(f"name ~ '{NAME_PATTERN}'", name=op.f("ck_llama_groups_name_format")),
        *(_positive("llama_groups", column) for column in LIMITS),
        *(_positive("llama_groups", f"tokens_per_{per}") for per in PERIODS),
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
    for column in ("rate_limit", "rate_window_seconds"):
        op.add_column("api_keys", sa.Column(column, sa.Integer(), nullable=True))
        op.create_check_constraint(
            op.f(f"ck_api_keys_{column}_positive"), "api_keys", f"{column} IS NULL OR {column} > 0"
        )
    op.add_column("api_keys", sa.Column("limits_key", sa.Text(), nullable=True))
    for per in PERIODS:
        op.add_column("api_keys", sa.Column(f"tokens_per_{per}", sa.BigInteger(), nullable=True))
        op.create_check_constraint(
            op.f(f"ck_api_keys_tokens_per_{per}_positive"),
            "api_keys",
            f"tokens_per_{per} IS NULL OR tokens_per_{per} > 0",
        )
    op.create_table(
        "llama_budget_spend",
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("starts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("holder", "period", "starts", name="pk_llama_budget_spend"),
    )
    op.create_table(
        "llama_budget_holds",
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("starts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "holder", "period", name="pk_llama_budget_holds"),
    )
    op.create_index("ix_llama_budget_holds_created_at", "llama_budget_holds", ["created_at"])
    op.create_table(
        "rate_subject_admissions",
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("admitted_at", sa.DateTime(timezone=True), nullable=False),
        prefixes=["UNLOGGED"],
    )
    op.create_index(
        "ix_rate_subject_admissions_subject_admitted_at",
        "rate_subject_admissions",
        ["subject", "admitted_at"],
    )
    op.create_table(
        "rate_subject_windows",
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("admissions", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("subject", name="pk_rate_subject_windows"),
        prefixes=["UNLOGGED"],
    )
    op.create_table(
        "llama_model_weights",
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("model", name="pk_llama_model_weights"),
        sa.CheckConstraint("weight > 0", name=op.f("ck_llama_model_weights_weight_positive")),
    )
    op.add_column("llama_requests", sa.Column("weight", sa.Float(), nullable=True))
    _quota_index(["prompt_tokens", "completion_tokens", "weight"])
    op.execute(NOTIFY_FUNCTION)
    for table in ("llama_groups", "llama_group_members", "llama_model_weights"):
        op.execute(
            f"CREATE TRIGGER {table}_notify AFTER INSERT OR UPDATE OR DELETE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION llama_gate_groups_notify()"
        )
    op.execute(KEY_LIMITS_TRIGGER)
    op.execute(RESERVE_FUNCTION)
    op.execute(SETTLE_FUNCTION)
    op.execute(ADMIT_SUBJECT_FUNCTION)
    op.execute(USAGE_BY_GROUP_VIEW)
    op.execute(GRANT_BY_GROUPS)
    op.execute(WAIT_WITH_GROUPS)
    op.execute(RELEASE_BY_GROUPS)


def downgrade() -> None:
    op.execute(RELEASE_0017)
    op.execute(WAIT_0017)
    op.execute(GRANT_0017)
    op.execute("DROP VIEW llama_usage_daily_by_group")
    op.execute("DROP FUNCTION llama_gate_admit_subject(text, integer, integer, integer)")
    op.execute("DROP FUNCTION llama_gate_budget_settle(text[], bigint[])")
    op.execute(
        "DROP FUNCTION llama_gate_budget_reserve(bigint, text, text, bigint, bigint, "
        "double precision, timestamptz)"
    )
    op.execute("DROP TRIGGER api_keys_notify_auth_limits ON api_keys")
    _quota_index(["prompt_tokens", "completion_tokens"])
    op.drop_column("llama_requests", "weight")
    op.drop_table("llama_model_weights")
    op.drop_table("rate_subject_windows")
    op.drop_table("rate_subject_admissions")
    op.drop_table("llama_budget_holds")
    op.drop_table("llama_budget_spend")
    op.drop_column("api_keys", "limits_key")
    for per in PERIODS:
        op.drop_column("api_keys", f"tokens_per_{per}")
    for column in ("rate_limit", "rate_window_seconds"):
        op.drop_column("api_keys", column)
    op.drop_table("llama_group_members")
    op.drop_table("llama_groups")
    op.execute("DROP FUNCTION llama_gate_groups_notify()")
