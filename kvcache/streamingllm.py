"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks plus the most recent tokens.

The first `sinks` tokens soak up attention whatever they say; keeping them and a window of the
latest tokens keeps a model stable on a cache of any budget. No scores are needed.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvcache.press import BIG, Press


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Press):
  """Keeps the `sinks` first tokens and the budget - sinks most recent ones per head."""

  window: int = 0
  sinks: int = 4

  def importance(self, layer, probs, pos, lengths):
    return jnp.where(pos < self.sinks, BIG, pos.astype(jnp.float32))  # recent = later position
