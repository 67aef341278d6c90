"""What several proxy processes share about each other, through Postgres."""
