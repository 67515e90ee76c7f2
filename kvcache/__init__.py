"""KV cache pytree, jit prefill / decode, batched generation (compression methods come later).

`generate(model, prompts, max_new_tokens=32)`; `prefill` / `decode_step` take (graphdef, params)
from `nnx.split(model)` and a `KVCache` (per layer K, V [B, K, S, E]; lengths [B]).
"""

from kvcache.cache import KVCache, init_cache
from kvcache.decode import decode_loop, decode_step, generate, prefill
from kvcache.sampling import SamplingConfig, sample

__all__ = ["KVCache", "SamplingConfig", "decode_loop", "decode_step", "generate", "init_cache",
           "prefill", "sample"]
