"""The upstream rerank API: HTTP client, retry policy and shared per-key limits."""
