"""S2-Attention: per-head strided context shards plus a local window.

`S2Pattern` is the block pattern (DKernel's parameters); `attn_impl="s2:vert_stride=8,..."`
selects S2 attention in the decoder (registered by s2attn.attention); `hybrid_layer_attn` builds
hybrid sparse/dense stacks; `s2_generate` decodes with the per-head compressed cache of
kvcache.s2_cache.
"""

from s2attn.attention import S2Options, make_s2_attention, s2_attention, s2_options_from_spec
from s2attn.decode import s2_decode_loop, s2_decode_step, s2_generate, s2_prefill
from s2attn.hybrid import dense_layer_ids, hybrid_layer_attn, s2_spec
from s2attn.pattern import S2Pattern

__all__ = ["S2Options", "S2Pattern", "dense_layer_ids", "hybrid_layer_attn",
           "make_s2_attention", "s2_attention", "s2_decode_loop", "s2_decode_step", "s2_generate",
           "s2_options_from_spec", "s2_prefill", "s2_spec"]
