"""The ledger: one `llama_requests` row per request, written in batches, never lost."""
