"""S2-Attention: per-head strided context shards plus a local window (filled by the S2 issue)."""
