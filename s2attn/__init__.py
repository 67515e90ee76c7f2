"""S2-Attention: per-head strided context shards plus a local window.

`S2Pattern` is the block pattern (DKernel's parameters); `attn_impl="s2:vert_stride=8,..."`
selects S2 attention in the decoder (registered by s2attn.attention, with the token mask the KV
cache applies when decoding); `hybrid_layer_attn` builds hybrid sparse/dense stacks;
`s2_compression` is S2's eviction as a kvcache policy (s2attn.cache): per-KV-head budgets, what
left the window evicted after every step.
"""

from s2attn.attention import (
  S2Options,
  make_s2_attention,
  s2_attention,
  s2_options_from_spec,
  s2_token_mask,
)
from s2attn.cache import LayerPlan, S2Eviction, budgets, cache_bytes, plan_layers, s2_compression
from s2attn.hybrid import dense_layer_ids, hybrid_layer_attn, s2_spec
from s2attn.pattern import S2Pattern

__all__ = ["LayerPlan", "S2Eviction", "S2Options", "S2Pattern", "budgets", "cache_bytes",
           "dense_layer_ids", "hybrid_layer_attn", "make_s2_attention", "plan_layers",
           "s2_attention", "s2_compression", "s2_options_from_spec", "s2_spec", "s2_token_mask"]
