"""MPCache: KV eviction made cheap under secure multi-party computation (filled by the MPCache
issue)."""
