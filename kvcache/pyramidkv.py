"""PyramidKV (Cai et al., arXiv 2406.02069): SnapKV's selection under pyramid layer budgets.

Lower layers spread their attention widely, upper layers focus: budgets fall arithmetically
from the first layer to the last, k^{L-1} = mean / beta, k^0 = 2 * mean - k^{L-1} (beta = 20),
with the same total as a uniform budget.
"""

from __future__ import annotations

import dataclasses

from kvcache.press import arithmetic_budgets
from kvcache.snapkv import SnapKV


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
  beta: float = 20.0

  def layer_budgets(self, n_layers, n_kv_heads, prompt):
    mean = self.tokens(prompt)
    per = arithmetic_budgets(mean * n_layers, n_layers, self.beta, self.window)
    return tuple((min(b, prompt),) * n_kv_heads for b in per)
