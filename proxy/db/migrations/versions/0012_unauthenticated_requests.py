"""llama_unauthenticated: requests without a valid key, counted per client address and minute

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06

A request with no valid key (a 401, a path that does not exist, a refused flood) used to be a
`llama_requests` row of its own, so a junk flood grew the database by a row a request. They are
now counted here instead: one row per client address and minute (addresses past a proxy's
per-minute bound are counted together under '(others)'), with the statuses and paths seen, so
the database grows by a bounded number of rows a minute whatever the flood.
`llama_gate_add_counts` adds two `{"key": count}` objects, as the proxies' upserts need.
`llama_usage_daily` counts them as the requests of no user (username NULL), as it counted the
rows of those requests before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "llama_unauthenticated",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client_addr", sa.Text, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("request_bytes", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("statuses", postgresql.JSONB, nullable=False),
        sa.Column("paths", postgresql.JSONB, nullable=False),
        sa.PrimaryKeyConstraint("minute", "client_addr", name="pk_llama_unauthenticated"),
    )
    # llama_usage_daily groups and filters it by UTC day, as it does llama_requests.
    op.create_index(
        "ix_llama_unauthenticated_day",
        "llama_unauthenticated",
        [sa.text("((minute AT TIME ZONE 'UTC')::date)")],
    )
    op.execute(
        """
        CREATE FUNCTION llama_gate_add_counts(a jsonb, b jsonb) RETURNS jsonb
        LANGUAGE sql IMMUTABLE AS $$
            SELECT coalesce(jsonb_object_agg(key, total), '{}'::jsonb)
            FROM (SELECT key, sum(value::bigint) AS total
                  FROM (SELECT key, value FROM jsonb_each_text(a)
                        UNION ALL
                        SELECT key, value FROM jsonb_each_text(b)) AS counts
                  GROUP BY key) AS summed
        $$
        """
    )

    op.execute("DROP VIEW llama_usage_daily")
    op.execute(USAGE_DAILY_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW llama_usage_daily")
    op.execute(USAGE_DAILY_0001)
    op.execute("DROP FUNCTION llama_gate_add_counts(jsonb, jsonb)")
    op.drop_table("llama_unauthenticated")


_DAY = "((created_at AT TIME ZONE 'UTC')::date)"
# The view as it stands after this revision, and as it stood before (migration 0001).
USAGE_DAILY_0001 = f"""
CREATE VIEW llama_usage_daily AS
SELECT {_DAY} AS day,
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
"""
USAGE_DAILY_VIEW = (
    USAGE_DAILY_0001.rstrip()
    + """
UNION ALL
SELECT ((minute AT TIME ZONE 'UTC')::date) AS day,
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
)
