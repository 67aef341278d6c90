"""Postgres: the pool, all runtime SQL, the schema, its migrations and a local server."""
