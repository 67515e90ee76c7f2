"""The KV cache that owns its reads and writes, jit prefill / decode, the one decode loop.

`generate(model, prompts, max_new_tokens=32)`; `prefill` / `decode_step` / `decode_loop` take
(graphdef, params) from `nnx.split(model)` and a `KVCache` (per layer, head groups of K, V
[B, Kg, N, E] and stored positions [B, Kg, N]; lengths [B]). Budgets are per layer and per KV
head (`init_cache(..., budgets=...)`); compression methods are `Compression` policies.
"""

from kvcache.attention import (
  register_decode_attention,
  slot_attention,
)
from kvcache.cache import (
  HeadGroup,
  KVCache,
  LayerCache,
  free_slots,
  init_cache,
  map_positions,
  repack,
  truncate,
)
from kvcache.compression import Compression
from kvcache.decode import (
  apply_policy,
  decode_loop,
  decode_step,
  generate,
  prefill,
  prefill_chunked,
)
from kvcache.sampling import SamplingConfig, sample

__all__ = ["Compression", "HeadGroup", "KVCache", "LayerCache", "SamplingConfig", "apply_policy",
           "decode_loop", "decode_step", "free_slots", "generate", "init_cache", "map_positions",
           "prefill", "prefill_chunked", "register_decode_attention", "repack", "sample",
           "slot_attention", "truncate"]
