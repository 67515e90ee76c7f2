"""H2O (Zhang et al., arXiv 2306.14048): heavy hitters plus recent tokens.

A token's importance is the attention it has accumulated from the queries so far (here the W
observation-window queries of the prompt, summed over the group's query heads); the cache keeps
the heaviest hitters and a recent window, half the budget each by default.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvcache.press import BIG, Press, attention_sum, topk_keep


@dataclasses.dataclass(frozen=True)
class H2O(Press):
  """budget per head = recent_ratio of it for the latest tokens, the rest heavy hitters."""

  window: int = 64
  recent_ratio: float = 0.5

  def importance(self, layer, probs, pos, lengths):
    return attention_sum(probs)  # accumulated attention A_j = sum_i a_ij

  def select(self, layer, importance, pos, lengths, budgets):
    recent = int(min(budgets) * self.recent_ratio)
    imp = jnp.where((pos >= 0) & (pos >= (lengths - recent)[:, None, None]), BIG, importance)
    return topk_keep(imp, pos, budgets)
