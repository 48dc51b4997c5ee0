"""Rate limits (GCRA, in Redis or in process memory) and per-user queue quotas."""
