"""The KV cache that owns its reads and writes, jit prefill / decode, the one decode loop.

`generate(model, prompts, max_new_tokens=32)`; `prefill` / `decode_step` / `decode_loop` take
(graphdef, params) from `nnx.split(model)` and a `KVCache` (per layer, head groups of K, V
[B, Kg, N, E] and stored positions [B, Kg, N]; lengths [B]). Budgets are per layer and per KV
head (`init_cache(..., budgets=...)`); compression methods are `Compression` policies. The
paged pool (`PagePool`, `PagedKV`), the radix tree over it (`RadixTree`) and `generate_shared`
share prompt prefixes across sequences (`shared_paged_attention`: each group's prefix
attended once). `kvcache.batchllm` groups a batch's prompts by shared prefix; `kvcache.engine`
serves a batch under FCFS + LRU, LPM or BatchLLM scheduling. Compression methods are presses
(`kvcache.press`: score -> select -> keep): StreamingLLM, H2O, SnapKV, PyramidKV, WindowKV.
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
  compute_weights,
  decode_loop,
  decode_step,
  generate,
  prefill,
  prefill_chunked,
)
from kvcache.h2o import H2O
from kvcache.paged import (
  PagedLayerCache,
  PrefixGroups,
  generate_shared,
  paged_decode_step,
  paged_prefill,
  prefix_groups,
  shared_paged_attention,
)
from kvcache.pool import OutOfPages, PagedKV, PagePool, copy_pages, init_paged_kv
from kvcache.press import Press
from kvcache.pyramidkv import PyramidKV
from kvcache.radix import RadixTree
from kvcache.sampling import SamplingConfig, sample
from kvcache.snapkv import SnapKV
from kvcache.streamingllm import StreamingLLM
from kvcache.windowkv import WindowKV

__all__ = ["H2O", "Press", "PyramidKV", "SnapKV", "StreamingLLM", "WindowKV",
           "Compression", "HeadGroup", "KVCache", "LayerCache", "OutOfPages", "PagePool",
           "PagedKV", "PagedLayerCache", "PrefixGroups", "RadixTree", "SamplingConfig",
           "apply_policy", "compute_weights", "copy_pages", "decode_loop", "decode_step",
           "free_slots", "generate",
           "generate_shared", "init_cache", "init_paged_kv", "map_positions", "paged_decode_step",
           "paged_prefill", "prefill", "prefill_chunked", "prefix_groups",
           "register_decode_attention", "repack", "sample", "shared_paged_attention",
           "slot_attention", "truncate"]
