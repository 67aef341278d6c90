"""Who is calling: API keys, their argon2id hashes, the verified-key cache and revocations."""
