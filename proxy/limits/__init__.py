"""What a caller may spend: the admission step, concurrency places, rate limits, token quotas."""
