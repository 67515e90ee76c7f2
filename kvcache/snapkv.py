"""SnapKV (Li et al., arXiv 2404.14469): what the observation window attends, clustered.

The last W prompt queries (the observation window, which holds the question when the prompt
ends with it) vote: each slot's score is its attention summed over the window's queries and the
group's query heads, max-pooled over neighbouring slots (kernel 5) so that the kept tokens come
in small clusters; each KV head keeps its top budget - W slots plus the window.
"""

from __future__ import annotations

import dataclasses

from kvcache.press import Press, attention_sum, pooled


@dataclasses.dataclass(frozen=True)
class SnapKV(Press):
  window: int = 32
  kernel: int = 5

  def importance(self, layer, probs, pos, lengths):
    return pooled(attention_sum(probs), self.kernel)
