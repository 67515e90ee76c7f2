"""The compression hook of the decode loop: a pure `cache -> cache` policy and when it runs.

A method (S2's eviction, SnapKV, H2O, WindowKV, MPCache, ...) is a function
`policy(cache, scores) -> cache` over kvcache.cache.KVCache, where scores are the attention
probabilities it asked for (None when it asked for none): after prefill, per layer and head group
[B, Kg, G, W, N] for the last `window` prompt queries; in the decode loop, [B, Kg, G, 1, N] for
the step's query. The policy may rebuild the cache with smaller budgets (kvcache.cache.repack)
after prefill; inside the loop it must keep shapes (mark slots empty with map_positions). The
cache knows none of the methods; this hook is all the plumbing they share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

Policy = Callable[..., object]


@dataclasses.dataclass(frozen=True)
class Compression:
  """When and with which scores the decode loop applies a policy (hashable: a jit static).

  Attributes:
    policy: policy(cache, scores) -> cache.
    window: observation window: prefill returns the probabilities of the last `window` prompt
      queries of each sequence over the cache for the policy (0 = no scores).
    every: also apply the policy after every `every` decode steps (0 = after prefill only).
    decode_scores: pass the step's probabilities to the in-loop policy (uses the jnp decode
      attention, which returns them).
    prefill_room: the prefill cache needs room only for the prompt (the policy builds the
      cache that decoding continues in); otherwise prefill uses the caller's budgets.
    decode_policy: the policy inside the loop, when it differs from the one after prefill
      (H2O: repack after prefill, then evict one slot at a time); None = `policy`.
  """

  policy: Policy
  window: int = 0
  every: int = 0
  decode_scores: bool = False
  prefill_room: bool = False
  decode_policy: Policy | None = None

  def __post_init__(self):
    for name in ("window", "every"):
      if getattr(self, name) < 0:
        raise ValueError(f"Compression.{name} must be >= 0, got {getattr(self, name)}")
