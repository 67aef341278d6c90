"""The Postgres schema as SQLAlchemy Core metadata: alembic migrates from it; nothing else does.

Runtime queries are hand-written asyncpg SQL in `proxy.db` (`accounts`, `ledger`, ...); this
module only describes tables.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# A letter or digit first: `--help`, `-` or `...` would read as options or as nothing.
USERNAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"

# Budget periods (calendar, in a group's time zone; a key's in UTC) and a group's other limits.
GROUP_PERIODS = ("minute", "day", "week", "month")
GROUP_LIMITS = ("rate_limit", "rate_window_seconds", "max_concurrent")


def _positive(*columns: str) -> list[CheckConstraint]:
    return [
        CheckConstraint(f"{column} IS NULL OR {column} > 0", name=f"{column}_positive")
        for column in columns
    ]


users = Table(
    "users",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    # Stored lower-cased and checked, so uniqueness is case-insensitive without citext.
    Column("username", Text, nullable=False, unique=True),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("rate_limit", Integer, nullable=True),
    Column("rate_window_seconds", Integer, nullable=True),
    CheckConstraint(f"username ~ '{USERNAME_PATTERN}'", name="username_format"),
    CheckConstraint("rate_limit IS NULL OR rate_limit > 0", name="rate_limit_positive"),
    CheckConstraint(
        "rate_window_seconds IS NULL OR rate_window_seconds > 0", name="rate_window_positive"
    ),
    # Per-user overrides of LLAMA_PROXY_MAX_CONCURRENT and MAX_TOKENS_HARD_CAP (NULL: the
    # setting), and token quotas (NULL: none).
    Column("max_concurrent", Integer, nullable=True),
    Column("max_tokens", Integer, nullable=True),
    Column("tokens_per_day", Integer, nullable=True),
    Column("tokens_per_minute", Integer, nullable=True),
    *(
        CheckConstraint(f"{column} IS NULL OR {column} > 0", name=f"{column}_positive")
        for column in ("max_concurrent", "max_tokens", "tokens_per_day", "tokens_per_minute")
    ),
    # The model the user's requests naming none get (POST /setModel); NULL: the server's default.
    Column("default_model", Text, nullable=True),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column(
        "user_id",
        BigInteger,
        ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    # The public half of a key: what lookups use and what may appear in logs.
    Column("key_id", Text, nullable=False, unique=True),
    Column("secret_hash", Text, nullable=False),
    Column("label", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    # A key's scope: the models (names or globs) and APIs it may use; NULL means all.
    Column("models", ARRAY(Text), nullable=True),
    Column("apis", ARRAY(Text), nullable=True),
    # A key's own request limit and token budgets (periods in UTC); NULL: none.
    Column("rate_limit", Integer, nullable=True),
    Column("rate_window_seconds", Integer, nullable=True),
    *(Column(f"tokens_per_{per}", BigInteger, nullable=True) for per in GROUP_PERIODS),
    # The key whose budgets' use and request window this one shares: the first of the keys it
    # was rotated from (both work during a rotation's grace, on one budget); NULL: its own.
    Column("limits_key", Text, nullable=True),
    *_positive(
        "rate_limit", "rate_window_seconds", *(f"tokens_per_{per}" for per in GROUP_PERIODS)
    ),
)

# Tokens that sign admins in to the dashboard (`llama-gate create-admin-token`): like api_keys, a
# public token id and an argon2id hash of the secret, never the secret itself.
admin_tokens = Table(
    "admin_tokens",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("token_id", Text, nullable=False, unique=True),
    Column("secret_hash", Text, nullable=False),
    Column("label", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

# One row per admitted request inside the longest rate window, pruned by `llama_gate_admit` (a
# plpgsql function of migration 0002, as are the auth-invalidation triggers). UNLOGGED: after a
# crash it restarts empty, which forgets at most one window of history and saves the WAL.
rate_admissions = Table(
    "rate_admissions",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("admitted_at", DateTime(timezone=True), nullable=False),
    Index("ix_rate_admissions_user_id_admitted_at", "user_id", "admitted_at"),
    prefixes=["UNLOGGED"],
)

# Each user's count of rate_admissions, kept by llama_gate_admit so no decision counts rows.
rate_windows = Table(
    "rate_windows",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("admissions", Integer, nullable=False),
    prefixes=["UNLOGGED"],
)

# One row per audit batch written, in the same transaction as the batch's rows: a batch retried
# after an ambiguous failure, or replayed from a spill file, is recognised and written once.
llama_audit_batches = Table(
    "llama_audit_batches",
    metadata,
    Column("batch_id", Uuid, primary_key=True),
    Column("written_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("row_count", Integer, nullable=False),
    Index("ix_llama_audit_batches_written_at", "written_at"),
)

# Requests without a valid key, counted per client address and minute (not a row each: a junk
# flood grows this by a bounded number of rows a minute). `llama_gate_add_counts` (a SQL function
# of migration 0012) adds the statuses and paths of the proxies' upserts.
llama_unauthenticated = Table(
    "llama_unauthenticated",
    metadata,
    Column("minute", DateTime(timezone=True), primary_key=True),
    Column("client_addr", Text, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("request_bytes", BigInteger, nullable=False, server_default=text("0")),
    Column("statuses", JSONB, nullable=False),
    Column("paths", JSONB, nullable=False),
    Index("ix_llama_unauthenticated_day", text("((minute AT TIME ZONE 'UTC')::date)")),
)

# Stored Responses API answers (`store`, LLAMA_PROXY_RESPONSES_RETENTION days): each keeps its own
# turn of the conversation as chat messages (what its input and output add), and the response it
# continued; `previous_response_id` walks that chain. Readable only by the user who made it.
llama_responses = Table(
    "llama_responses",
    metadata,
    Column("id", Text, primary_key=True),
    Column(
        "user_id",
        BigInteger,
        ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
    Column("previous_id", Text, nullable=True),
    Column("input_items", JSONB, nullable=False),
    Column("messages", JSONB, nullable=False),
    Column("response", JSONB, nullable=False),
)

# Each proxy process's presence (`proxy.cluster.presence`): refreshed every few seconds with what
# it is doing now; a row not refreshed for a while is a process that is gone.
llama_proxies = Table(
    "llama_proxies",
    metadata,
    Column("id", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("seen_at", DateTime(timezone=True), nullable=False),
    Column("live", JSONB, nullable=False),
    # switched to shared backend slots (`proxy.cluster.slots`): grants wait for every live one
    Column("shared", Boolean, nullable=False, server_default=text("false")),
)

# Backend slots shared by proxy processes (`proxy.cluster.slots`, migration 0017's functions
# make every grant). UNLOGGED: they live as long as the requests do; after a crash of Postgres
# each process writes back the leases it holds at its next renewal.
llama_slot_backends = Table(
    "llama_slot_backends",
    metadata,
    Column("backend", Text, primary_key=True),
    Column("slots", Integer, nullable=False),
    prefixes=["UNLOGGED"],
)

# A request's turn at a backend's slot, held by its process while it runs (renewed); `lone`
# rows count, `n` at a time, what a process that just switched still runs from before.
llama_slot_leases = Table(
    "llama_slot_leases",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("backend", Text, nullable=False, index=True),
    Column("proxy_id", Text, nullable=False, index=True),
    Column("user_id", BigInteger, nullable=True, index=True),
    Column("n", Integer, nullable=False, server_default=text("1")),
    Column("lone", Boolean, nullable=False, server_default=text("false")),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    prefixes=["UNLOGGED"],
)

# Requests waiting for a slot of one of `backends`, whichever process they wait in.
llama_slot_waiters = Table(
    "llama_slot_waiters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("proxy_id", Text, nullable=False, index=True),
    Column("user_id", BigInteger, nullable=False, index=True),
    Column("backends", ARRAY(Text), nullable=False),
    Column("prefer", Text, nullable=True),
    Column("conversation", Text, nullable=True),  # its digest (`proxy.upstream.affinity`)
    Column("enqueued_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    prefixes=["UNLOGGED"],
)

# Which backend last served each conversation (by digest), through whichever process.
llama_slot_conversations = Table(
    "llama_slot_conversations",
    metadata,
    Column("digest", Text, primary_key=True),
    Column("backend", Text, nullable=False),
    Column("seen_at", DateTime(timezone=True), nullable=False),
    prefixes=["UNLOGGED"],
)

# One row, emptied with the tables above by a crash of Postgres: when the slots' current epoch
# began (the first renewal after the crash begins another; grants wait until all renewed).
llama_slot_epoch = Table(
    "llama_slot_epoch",
    metadata,
    Column("one", Boolean, primary_key=True, server_default=text("true")),
    Column("began", DateTime(timezone=True), nullable=False),
    CheckConstraint("one", name="one_row"),
    prefixes=["UNLOGGED"],
)

# When each user with something held or waiting was last granted a slot: the fair order.
llama_slot_turns = Table(
    "llama_slot_turns",
    metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("turn", DateTime(timezone=True), nullable=False),
    prefixes=["UNLOGGED"],
)

# Groups of users (a team, a class, a project): members, a request limit per window, a cap on
# their requests at once, and token budgets over calendar periods in `time_zone` (NULL: none).
llama_groups = Table(
    "llama_groups",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("time_zone", Text, nullable=False, server_default=text("'UTC'")),
    *(Column(column, Integer, nullable=True) for column in GROUP_LIMITS),
    *(Column(f"tokens_per_{per}", BigInteger, nullable=True) for per in GROUP_PERIODS),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(f"name ~ '{USERNAME_PATTERN}'", name="name_format"),
    *_positive(*GROUP_LIMITS, *(f"tokens_per_{per}" for per in GROUP_PERIODS)),
)

llama_group_members = Table(
    "llama_group_members",
    metadata,
    Column(
        "group_id",
        BigInteger,
        ForeignKey("llama_groups.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "user_id",
        BigInteger,
        ForeignKey("users.id", ondelete="CASCADE"),
        primary_key=True,
        index=True,
    ),
)

# Each budget holder's use per period (`g:<group id>`, `k:<key id>`): charged before a request
# runs and settled when it ends (llama_budget_holds), by migration 0018's functions
# (`proxy.limits.budgets`).
llama_budget_spend = Table(
    "llama_budget_spend",
    metadata,
    Column("holder", Text, primary_key=True),
    Column("period", Text, primary_key=True),
    Column("starts", DateTime(timezone=True), primary_key=True),
    Column("tokens", BigInteger, nullable=False),
)

# What each running request was charged, until it says what it cost.
llama_budget_holds = Table(
    "llama_budget_holds",
    metadata,
    Column("request_id", Text, primary_key=True),
    Column("holder", Text, primary_key=True),
    Column("period", Text, primary_key=True),
    Column("starts", DateTime(timezone=True), nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
)

# Sliding windows of keys' and groups' request limits (`k:<key id>`, `g:<group id>`), as
# rate_admissions and rate_windows are users'.
rate_subject_admissions = Table(
    "rate_subject_admissions",
    metadata,
    Column("subject", Text, nullable=False),
    Column("admitted_at", DateTime(timezone=True), nullable=False),
    Index("ix_rate_subject_admissions_subject_admitted_at", "subject", "admitted_at"),
    prefixes=["UNLOGGED"],
)

rate_subject_windows = Table(
    "rate_subject_windows",
    metadata,
    Column("subject", Text, primary_key=True),
    Column("admissions", Integer, nullable=False),
    prefixes=["UNLOGGED"],
)

# What a token of a model costs against budgets and quotas (a model not listed: 1).
llama_model_weights = Table(
    "llama_model_weights",
    metadata,
    Column("model", Text, primary_key=True),
    Column("weight", Float, nullable=False),
    CheckConstraint("weight > 0", name="weight_positive"),
)

# The day a row belongs to, in UTC: the grouping key of llama_usage_daily, indexed so that
# "per user per day, last 30 days" reads only the rows it reports on.
USAGE_DAY = "((created_at AT TIME ZONE 'UTC')::date)"
UNAUTHENTICATED_DAY = "((minute AT TIME ZONE 'UTC')::date)"

llama_requests = Table(
    "llama_requests",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("request_id", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # No foreign key: a row written after its user was deleted (a request still running then)
    # must not be refused, and the audit trail outlives the account anyway (it keeps username).
    Column("user_id", BigInteger, nullable=True),
    Column("username", Text, nullable=True),
    Column("key_id", Text, nullable=True),
    Column("method", Text, nullable=True),
    Column("path", Text, nullable=False),
    Column("model", Text, nullable=True),
    Column("stream", Boolean, nullable=True),
    Column("status_code", Integer, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("ttfb_ms", Float, nullable=True),
    Column("queue_ms", Float, nullable=True),
    Column("request_bytes", BigInteger, nullable=False, server_default=text("0")),
    Column("response_bytes", BigInteger, nullable=False, server_default=text("0")),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("client_addr", Text, nullable=True),
    Column("error", Text, nullable=True),
    # The client's X-Request-Id (request_id is always the proxy's own, unique).
    Column("client_request_id", Text, nullable=True),
    Column("backend", Text, nullable=True),  # the backend that served the request
    # Whom the client says the request is for (OpenAI's `user`, Anthropic's metadata.user_id).
    Column("end_user", Text, nullable=True),
    # Of prompt_tokens, those the backend's prompt cache spared it from reading again.
    Column("cached_tokens", Integer, nullable=True),
    # The model's weight applied to its tokens against budgets and quotas (NULL: 1).
    Column("weight", Float, nullable=True),
    Index("ix_llama_requests_created_at", "created_at"),
    Index("ix_llama_requests_username_created_at", "username", "created_at"),
    Index("ix_llama_requests_day_username", text(USAGE_DAY), "username"),
    # Token quotas: one user's tokens since a moment, often without reading the table itself.
    Index(
        "ix_llama_requests_user_id_created_at",
        "user_id",
        "created_at",
        postgresql_include=["prompt_tokens", "completion_tokens", "weight"],
    ),
)

# Per UTC day and user; requests that had no valid key (`llama_unauthenticated`) are the rows
# whose username is NULL (with no tokens or latency: they never reached a model).
USAGE_DAILY_VIEW = f"""
CREATE VIEW llama_usage_daily AS
SELECT {USAGE_DAY} AS day,
       username,
       count(*) AS requests,
       count(*) FILTER (WHERE status_code >= 400) AS errors,
       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens,
       coalesce(sum(request_bytes), 0) AS bytes_in,
       coalesce(sum(response_bytes), 0) AS bytes_out,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1) AS p50_ms,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms)::numeric, 1) AS p95_ms
FROM llama_requests
GROUP BY 1, 2
UNION ALL
SELECT {UNAUTHENTICATED_DAY} AS day,
       NULL::text AS username,
       sum(requests) AS requests,
       sum(requests) AS errors,
       0 AS prompt_tokens,
       0 AS completion_tokens,
       sum(request_bytes) AS bytes_in,
       0 AS bytes_out,
       NULL::numeric AS p50_ms,
       NULL::numeric AS p95_ms
FROM llama_unauthenticated
GROUP BY 1
"""
