"""The HTTP edge: what is settled before any API logic runs (malformed HTTP, slow senders, path
tricks, browsers' CORS)."""
